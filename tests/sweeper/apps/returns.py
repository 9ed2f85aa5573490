"""Toy Hydra app returning what ``kind`` says: a number, None, a string, a dict, nan, a list; or raising an error,
or optuna.TrialPruned. The sweeper must record each non-number as a FAIL with the reason and go on."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="returns")
def main(cfg: DictConfig):
    if cfg.kind == "raise":
        raise ValueError("the job broke")
    if cfg.kind == "pruned":
        import optuna

        raise optuna.TrialPruned("stopped early")
    return {"number": 1.5, "none": None, "str": "0.5", "dict": {"acc": 0.5}, "nan_value": float("nan"), "list": [1.0]}[
        cfg.kind
    ]


if __name__ == "__main__":
    main()
