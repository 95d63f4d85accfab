import pytest

from clfpipe.contract.errors import RecipeError
from clfpipe.contract.recipe import AUTO_WORKERS_MAX, Recipe, dump_recipe, load_recipe, recipe_from_dict, usable_cpus
from tests.conftest import DEMO_RECIPE


def test_defaults_load_without_a_file():
    recipe = load_recipe(None)
    assert recipe == Recipe()
    assert recipe.model.arch == "resnet34"


def test_demo_recipe_loads_and_round_trips(tmp_path):
    recipe = load_recipe(DEMO_RECIPE)
    assert [s.size for s in recipe.stages] == [48, 48, 48, 64] and recipe.model.weights == "none"
    assert recipe.stages[0].precompute and recipe.stages[2].lr == (5e-4, 7e-4, 1e-3)
    path = tmp_path / "resolved.toml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_a_shipped_recipe_is_named_from_any_folder_and_a_path_wins(tmp_path, monkeypatch):
    """`clfpipe demo` read recipes/demo.toml relative to the current folder: from anywhere but a
    checkout's root it said 'recipe file not found'."""
    monkeypatch.chdir(tmp_path)
    assert load_recipe("demo") == load_recipe(DEMO_RECIPE)
    assert load_recipe("resnet34").model.arch == "resnet34" and load_recipe("resnext50").model.arch == "resnext50_32x4d"
    (tmp_path / "resnet34").mkdir()  # a folder of that name is no recipe: it said "Is a directory"
    assert load_recipe("resnet34").model.arch == "resnet34"
    (tmp_path / "demo").write_text("seed = 5\n")  # a file of that name here is the user's own
    assert load_recipe("demo").seed == 5
    with pytest.raises(RecipeError, match=r"recipe file not found: nope \(expected a TOML file, or one of the recipes "
                                          r"that ship with clfpipe: demo, peer, resnet34, resnext50\)"):
        load_recipe("nope")


def test_a_batch_of_one_is_refused_as_batchnorm_cannot_train_on_it():
    """It was torch's 'Expected more than 1 value per channel when training' traceback at the first step."""
    with pytest.raises(RecipeError, match=r"data.batch_size: expected a finite number in \[2, 65536\], got 1"):
        load_recipe(None, ["data.batch_size=1"])
    from clfpipe.train.distributed import Dist, per_rank_batch

    assert per_rank_batch(4, Dist(rank=0, world=2, local_rank=0)) == 2
    with pytest.raises(RecipeError, match="at least 2 images a rank, got 2"):
        per_rank_batch(2, Dist(rank=0, world=2, local_rank=0))


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\narch = "resnet34"\nwieghts = "none"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "'model.wieghts'" in message
    for valid in ("arch", "weights", "hidden", "dropout"):
        assert valid in message


def test_unknown_stage_key_is_reported_with_its_index():
    with pytest.raises(RecipeError, match=r"stages\.1\.cyclelen.*cycle_len"):
        recipe_from_dict({"stages": [{"name": "a"}, {"name": "b", "cyclelen": 2}]})


def test_overrides_parse_toml_values_and_bare_words():
    recipe = load_recipe(DEMO_RECIPE, ["model.weights=imagenet", "stages.0.epochs=2", "stages.*.lr=[1e-4, 1e-3, 1e-2]", "seed=7"])
    assert recipe.model.weights == "imagenet"
    assert recipe.stages[0].epochs == 2
    assert recipe.stages[0].lr == (1e-4, 1e-3, 1e-2)
    assert recipe.seed == 7


def test_wrong_types_and_choices_say_what_was_expected():
    with pytest.raises(RecipeError, match="expected int, got 'two'"):
        load_recipe(None, ["stages.0.epochs=two"])
    with pytest.raises(RecipeError, match=r"expected one of .*resnet34.*resnext50_32x4d.*, got 'vgg'"):
        load_recipe(None, ["model.arch=vgg"])
    with pytest.raises(RecipeError, match="expected one positive value or 3"):
        load_recipe(None, ["stages.0.lr=[1e-3, 1e-2]"])


def test_bad_override_syntax_and_index():
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(None, ["epochs"])
    with pytest.raises(RecipeError, match="stage index below 1"):
        load_recipe(None, ["stages.3.epochs=1"])


def test_preprocess_spec_follows_the_last_stage_size():
    recipe = load_recipe(None, ["stages.0.size=96", "data.resize_scale=1.25"])
    spec = recipe.preprocess_spec()
    assert (spec.resize, spec.crop) == (120, 96)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 1")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)


def test_decoded_cache_is_gib_or_auto():
    auto = load_recipe(None, []).data
    assert auto.decoded_cache_gib == "auto"
    assert (auto.decoded_cache_bytes(80 * 2**30), auto.decoded_cache_bytes(None)) == (20 * 2**30, 0)  # a quarter; none on the CPU
    assert load_recipe(None, ["data.decoded_cache_gib=1.5"]).data.decoded_cache_bytes(None) == 3 * 2**29
    assert load_recipe(None, ["data.decoded_cache_gib=0"]).data.decoded_cache_bytes(80 * 2**30) == 0
    with pytest.raises(RecipeError, match="data.decoded_cache_gib: expected a number or 'auto', got 'lots'"):
        load_recipe(None, ["data.decoded_cache_gib=lots"])
    with pytest.raises(RecipeError, match=r"data.decoded_cache_gib: expected a finite number in \[0, 65536\], got -1.0"):
        load_recipe(None, ["data.decoded_cache_gib=-1"])


def test_num_workers_is_a_count_or_auto():
    assert load_recipe(None, ["data.num_workers=3"]).data.workers() == 3
    auto = load_recipe(None, ["data.num_workers=auto"]).data
    assert auto.num_workers == "auto"
    assert (auto.workers(cpus=2), auto.workers(cpus=64)) == (2, AUTO_WORKERS_MAX)  # fastai's min(16, cpus)
    assert auto.workers() == min(AUTO_WORKERS_MAX, usable_cpus())
    # no more workers than batches an epoch (each builds whole batches), at least one
    assert (auto.workers(cpus=64, batches=3), auto.workers(cpus=2, batches=3), auto.workers(cpus=64, batches=0)) == (3, 2, 1)
    assert load_recipe(None, ["data.num_workers=5"]).data.workers(batches=1) == 5  # a count is what it says
    with pytest.raises(RecipeError, match="data.num_workers: expected a number or 'auto', got 'many'"):
        load_recipe(None, ["data.num_workers=many"])
    with pytest.raises(RecipeError, match=r"data.num_workers: expected int or str, got \[2\]"):
        load_recipe(None, ["data.num_workers=[2]"])
    with pytest.raises(RecipeError, match=r"data.num_workers: expected a finite number in \[0, 1024\], got -1"):
        load_recipe(None, ["data.num_workers=-1"])
    with pytest.raises(RecipeError, match="expected int or str, got True"):
        load_recipe(None, ["data.num_workers=true"])
