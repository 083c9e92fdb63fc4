"""Class detection on the pairwise scores of a prepared explain-* run, shared by the paper's
generation and diffusion studies (the paper's Table 2): every method's scores streamed into a
temporary folder of the run, and the class-detection AUC and recall per test example (the
reports show them beside the paper's numbers: report/templates/macros.html, class_table)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..jobs.pairwise import matrix_folder, score_queries
from ..metrics import class_detection


def score_classes(p, job, train_classes: np.ndarray, test_classes: np.ndarray
                  ) -> tuple[pd.DataFrame, dict, dict]:
    """(table, methods, tops): ``table`` one row per method (auc_mean, auc_std, recall_mean,
    recall_std, auc_magnitude, seconds); ``methods`` the same rounded for summary.json, with
    the method's notes (LiSSA: converged); ``tops`` as :func:`score_queries` gives them."""
    with matrix_folder(p.run.out) as folder:
        with p.run.stage("scoring"):
            tops, seconds, notes = score_queries(p.inputs, folder=folder,
                                                 **{**job.scoring(), "matrix": True})
        metrics = {m: class_detection(np.load(folder / f"{m}.npy"), train_classes,
                                      test_classes) for m in job.methods}
    table = pd.DataFrame([{"method": m, "auc_mean": v["auc"].mean(), "auc_std": v["auc"].std(),
                           "recall_mean": v["recall"].mean(), "recall_std": v["recall"].std(),
                           "auc_magnitude": v["auc_magnitude"].mean(), "seconds": seconds[m]}
                          for m, v in metrics.items()])
    methods = {r.method: {"auc": round(r.auc_mean, 4), "auc_std": round(r.auc_std, 4),
                          "recall": round(r.recall_mean, 4), "recall_std": round(r.recall_std, 4),
                          "auc_magnitude": round(r.auc_magnitude, 4),
                          "seconds": round(r.seconds, 3), **notes.get(r.method, {})}
               for r in table.itertuples()}
    return table, methods, tops
