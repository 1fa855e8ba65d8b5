"""The pipeline's steps, one module each (weakseg.steps.base: the step model).

`STEP_NAMES` is the order of weakseg.steps.pipeline.STEPS, written here without importing
the steps (they load torch) so that `weakseg --help` and `weakseg report` start fast, and so
is `STAGE_OF_STEP` (each Step's `stage`: the results.json stage its metrics fill); a test
keeps them equal.
"""

STEP_NAMES = ("train_cam", "infer_cam", "train_affinity", "refine", "pseudo_labels", "label_rounds", "train_seg", "predict",
              "evaluate")
STAGE_OF_STEP = {"infer_cam": "cam", "refine": "refined", "pseudo_labels": "pseudo_labels", "evaluate": "final"}
# The stage metrics results.json keeps.
METRIC_KEYS = ("miou", "contour_f", "jf", "boundary_iou")


def stages_and_seconds(done_by_step: dict[str, dict]) -> dict:
    """results.json's `stages` (in pipeline order) and `seconds` from finished steps' done.json
    records (step name -> record): shared by `weakseg run` and `weakseg report`."""
    stages = {}
    for name in STEP_NAMES:
        if name in done_by_step and name in STAGE_OF_STEP:
            result = done_by_step[name].get("result") or {}
            stages[STAGE_OF_STEP[name]] = {k: result[k] for k in METRIC_KEYS if k in result}
    return {"stages": stages, "seconds": {name: done.get("seconds") for name, done in done_by_step.items()}}
