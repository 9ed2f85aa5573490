"""Toy Hydra app with two objectives, returned as a tuple: x^2 and (x - 2)^2 (Pareto front: 0 <= x <= 2)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="two_objectives")
def main(cfg: DictConfig) -> tuple[float, float]:
    return cfg.x**2, (cfg.x - 2) ** 2


if __name__ == "__main__":
    main()
