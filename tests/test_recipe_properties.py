"""Random recipes and --set overrides: a valid Recipe or one one-line RecipeError, never a
traceback or a hang (the values that used to hang training, like cycle_len = 0, included)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clfpipe.contract.errors import RecipeError
from clfpipe.contract.recipe import (
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    LrFindConfig,
    ModelConfig,
    Recipe,
    ServeConfig,
    StageConfig,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
)

SECTIONS = {"model": ModelConfig, "data": DataConfig, "lr_find": LrFindConfig, "evaluate": EvaluateConfig,
            "export": ExportConfig, "serve": ServeConfig}
STAGE_KEYS = [f.name for f in dataclasses.fields(StageConfig)]

scalars = st.one_of(
    st.booleans(), st.integers(-(10**30), 10**30), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 7, 32, 64, 1e-3, 0.5, 1.0, -1, "none", "sgdr", "overfit", "epochs", "head", "all", "fp16", "resnet34", "auto", ""]),
    st.text(max_size=12),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars, max_size=3))


def _table(keys: list[str]) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(keys + ["junk"]), values, max_size=5)


recipes = st.fixed_dictionaries({}, optional={
    **{name: st.one_of(_table([f.name for f in dataclasses.fields(cls)]), values) for name, cls in SECTIONS.items()},
    "seed": values,
    "stages": st.one_of(st.lists(st.one_of(_table(STAGE_KEYS), values), max_size=4), values),
    "junk": values,
})
override_keys = st.sampled_from(["seed", "stages.0.epochs", "stages.*.cycle_len", "stages.0", "stages.9.size", "seed.x",
                                 "model.dropout", "serve.model_instances", "data.num_workers", "stages.*.lr", "stages.*.until", "lr_find.start", "data", ".", ""])
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", override_keys,
                               st.sampled_from(["0", "-1", "nan", "inf", "[1, 2]", "[]", "{a = 1}", "abc", "1e400", "7", "2", '""', "auto", "overfit"])),
                     max_size=4)


def _valid_or_one_line(build) -> Recipe | None:
    try:
        recipe = build()
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc), str(exc)
        return None
    recipe.preprocess_spec()  # what the manifest records must be constructible
    assert recipe_from_dict(recipe.to_dict()) == recipe
    dump_recipe(recipe)
    return recipe


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
@example({"model": {"\n": False}})  # an unknown key with a newline: echoed as typed, it made a two-line error
def test_random_recipes_are_valid_or_one_line_errors(data):
    _valid_or_one_line(lambda: recipe_from_dict(data))


@settings(max_examples=300, deadline=2000)
@given(overrides)
@example(["stages.9.size=\"\"\"a\nb\"\"\""])  # a TOML string with a newline, in the --set text an error repeats
def test_random_overrides_are_valid_or_one_line_errors(sets):
    _valid_or_one_line(lambda: load_recipe(None, sets))


@pytest.mark.parametrize("override, message", [
    ("stages.0.cycle_len=0", "cycle_len: expected a finite number in [1, 100000], got 0"),
    ("stages.0.cycle_mult=-1", "cycle_mult: expected a finite number in [1, 100], got -1"),
    ("stages.0.lr=nan", "lr: expected a finite number in [1e-12, 100], got nan"),
    ("stages.0.lr=inf", "lr: expected a finite number"),
    ("model.hidden=-5", "model.hidden: expected a finite number in [1, 65536], got -5"),
    ("model.dropout=[0.5, 1.0]", "model.dropout: expected a finite number in [0, 0.99], got 1.0"),
    ("serve.model_instances=-1", "serve.model_instances: expected a finite number in [1, 64], got -1"),
    ("stages.0.size=7", "size: expected a finite number in [32, 4096], got 7"),
    ("seed.x=1", "seed: expected int, got {'x': 1}"),
    ("seed.x=1", "--set seed.x=1: expected a table to hold 'x', got the value 0"),
    ("stages.0=5", "stages.0.: expected a table, got 5"),
    ("stages.0.epochs=5", "expected epochs to be a whole number of SGDR cycles"),
])
def test_the_values_that_used_to_pass_are_refused(override, message):
    base = ["stages.0.schedule=sgdr", "stages.0.cycle_mult=2", "stages.0.epochs=3"] if "SGDR" in message else []
    base += ["seed=0"] if "got the value 0" in message else []
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [*base, override])
    assert message in str(err.value) and "\n" not in str(err.value)
