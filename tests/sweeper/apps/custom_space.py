"""A ``hydra.sweeper.custom_search_space`` for the toy apps: called as function(config, trial) after each ask."""


def add_side(config, trial) -> None:
    # A conditional parameter, which the override grammar cannot say: side is searched only where y < 0.
    if trial.params["y"] < 0:
        trial.suggest_categorical("side", ["low", "high"])
