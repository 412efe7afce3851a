"""Small cells in a synthetic cohort: codes and label combinations held by fewer than k real training patients
(``data/smallcells.py`` counts them; the merge stage's ``small_cell_k`` option suppresses them). Real counts are
shown only as "< k": the report itself stays above the floor."""
from __future__ import annotations

import pandas as pd

from ..data.smallcells import real_counts, small_cells
from .cohort import Cohort


def small_cell_section(train: Cohort, synth: Cohort, codes_synth: pd.DataFrame, codes_real: pd.DataFrame,
                       k: int) -> dict:
    cols = [c for c in train.space.label_columns if c in train.patients.columns and c in synth.patients.columns]
    cc, combos = real_counts(train.patients, codes_real, cols)
    cells = small_cells(cc, combos, synth.patients, codes_synth[codes_synth["patient_id"].isin(
        synth.patients["patient_id"])], cols, k)
    m = {"smallcells.k": float(k), "smallcells.synthetic_patients": float(cells["n_patients"]),
         "smallcells.synthetic_share": cells["n_patients"] / max(synth.n_patients, 1),
         "smallcells.codes": float(len(cells["codes"])), "smallcells.label_combinations": float(len(cells["combos"])),
         "smallcells.real_rare_codes": float(cells["n_rare_real_codes"])}
    rows = [{"cell": f"code {c}", "real training patients": f"< {k}", "synthetic patients": int(n)}
            for c, n in cells["codes"].head(20).items()]
    rows += [{"cell": f"labels {c}", "real training patients": f"< {k}", "synthetic patients": int(n)}
             for c, n in cells["combos"].head(10).items()]
    notes = []
    if cells["n_patients"]:
        notes.append(f"small cells: {cells['n_patients']} synthetic patients carry a code or label combination held "
                     f"by fewer than {k} real training patients; merge with small_cell_k={k} to suppress them, or "
                     f"train with min_code_count={k}.")
    return {"metrics": m, "table": pd.DataFrame(rows), "notes": notes}
