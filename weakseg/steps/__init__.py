"""The pipeline's steps, one module each (weakseg.steps.base: the step model).

`STEP_NAMES` is the order of weakseg.steps.pipeline.STEPS, written here without importing
the steps (they load torch) so that `weakseg --help` and `weakseg report` start fast, and so
is `STAGE_OF_STEP` (each Step's `stage`: the results.json stage its metrics fill); a test
keeps them equal.
"""

STEP_NAMES = ("train_cam", "infer_cam", "train_affinity", "refine", "pseudo_labels", "train_seg", "predict", "evaluate")
STAGE_OF_STEP = {"infer_cam": "cam", "refine": "refined", "pseudo_labels": "pseudo_labels", "evaluate": "final"}
