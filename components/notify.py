"""notify: the exit handler's task; records how the whole run ended."""
from kfp import dsl

from components._images import NOTIFY_IMAGE


@dsl.component(base_image=NOTIFY_IMAGE, install_kfp_package=False)
def notify(status: dsl.PipelineTaskFinalStatus) -> str:
    """Log the final state of the run (SUCCEEDED, FAILED, ...) with its error, and return the state.

    Args:
        status: Final status of the tasks inside the exit handler, filled in by KFP.

    Returns:
        The final state string.
    """
    import json

    print(json.dumps({"synthehr_run": status.pipeline_job_resource_name, "state": status.state,
                      "task": status.pipeline_task_name, "error_code": status.error_code,
                      "error_message": status.error_message}), flush=True)
    return status.state
