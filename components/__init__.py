"""synthehr KFP components: one thin wrapper per stage over ``synthehr_core`` (see docs/canonical-tables.md).

Each module holds one ``@dsl.component`` whose body imports ``synthehr_core``, calls the stage's one library
function and records artifact metadata. Module tops import only the stdlib, kfp and ``components._images``.
"""
