"""FT search space: empty. FT has no hyperparameter, so a sweep runs the preset over seeds."""

SPACE: dict = {}
PRESET: dict = {}
