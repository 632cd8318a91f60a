"""Training config: recipes, override parsing, errors, JSON round trip, resume compatibility."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainer.config import (
    FIELD_NAMES,
    RECIPES,
    ConfigError,
    TrainConfig,
    compatibility_problems,
    config_from_dict,
    config_to_dict,
    resolve_config,
)


def test_defaults_are_the_paper_recipe():
    c = TrainConfig()
    assert c.recipe == "softmax_triplet_with_center"
    assert (c.arch, c.last_stride, c.neck, c.height, c.width) == ("resnet50", 1, "bnneck", 256, 128)
    assert (c.optimizer, c.lr, c.weight_decay, c.epochs) == ("adam", 3.5e-4, 5e-4, 120)
    assert (c.warmup, c.warmup_epochs, c.warmup_factor, c.milestones, c.gamma) == (True, 10, 0.01, (40, 70), 0.1)
    assert (c.num_identities, c.num_instances, c.batch_size) == (16, 4, 64)
    assert (c.label_smoothing, c.triplet_margin, c.center_loss_weight, c.center_lr) == (0.1, 0.3, 5e-4, 0.5)
    assert (c.random_erasing_p, c.flip_p, c.pad) == (0.5, 0.5, None)  # None: 10 px at 256x128, scaled
    assert c.uses_triplet and c.uses_center
    assert resolve_config() == c


def test_recipes_resolve_to_small_overrides():
    assert set(RECIPES) == {"baseline", "softmax_triplet", "softmax_triplet_with_center"}
    for name, over in RECIPES.items():
        assert set(over) <= set(FIELD_NAMES)
        c = resolve_config(name)
        assert c.recipe == name
        for f in FIELD_NAMES:
            if f != "recipe":
                assert getattr(c, f) == over.get(f, getattr(TrainConfig(), f)), (name, f)
    b = resolve_config("baseline")
    assert (b.last_stride, b.neck, b.warmup, b.random_erasing_p, b.label_smoothing) == (2, "none", False, 0, 0)
    assert b.uses_triplet and not b.uses_center
    st = resolve_config("softmax_triplet")
    assert not st.uses_center and st.neck == "bnneck" and st.label_smoothing == 0.1


def test_overrides_parse_into_field_types():
    c = resolve_config(
        "softmax_triplet",
        ["epochs=3", "lr=1e-3", "warmup=no", "channels_last=0", "milestones=5,8", "max_steps_per_epoch=7",
         "triplet_margin=none", "pretrained=imagenet", "mean=0.5, 0.5, 0.5", "amp = off"],
    )
    assert c.epochs == 3 and isinstance(c.epochs, int)
    assert c.lr == 1e-3 and c.warmup is False and c.channels_last is False
    assert c.milestones == (5, 8) and c.max_steps_per_epoch == 7 and c.triplet_margin is None
    assert c.pretrained == "imagenet" and c.mean == (0.5, 0.5, 0.5) and c.amp == "off"
    assert resolve_config(overrides=["milestones="]).milestones == ()
    assert resolve_config(overrides=["milestones=(30,)"]).milestones == (30,)
    assert resolve_config(overrides=["max_steps_per_epoch=None"]).max_steps_per_epoch is None
    assert resolve_config(overrides=["warmup=YES"]).warmup is True
    # mappings are accepted too, with typed or string values; later wins in lists
    assert resolve_config(overrides={"epochs": 2, "milestones": [1], "warmup": "false"}).milestones == (1,)
    assert resolve_config(overrides=["epochs=2", "epochs=4"]).epochs == 4


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides=["epoch=3"])
    msg = str(e.value)
    assert "'epoch'" in msg and "epochs" in msg and "num_identities" in msg and "triplet_margin" in msg


def test_unknown_recipe_lists_recipes():
    with pytest.raises(ConfigError, match="baseline, softmax_triplet, softmax_triplet_with_center"):
        resolve_config("strong")


@pytest.mark.parametrize(
    "override, match",
    [
        ("epochs=ten", "epochs='ten'"),
        ("epochs=1.5", "epochs"),
        ("warmup=maybe", "warmup"),
        ("milestones=40,x", "milestones"),
        ("lr=fast", "lr"),
        ("noequals", "key=value"),
    ],
)
def test_unparseable_value_names_it(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(overrides=[override])


@pytest.mark.parametrize(
    "override",
    [
        "epochs=0", "num_instances=0", "num_identities=1", "flip_p=1.5", "random_erasing_p=-0.1",
        "label_smoothing=1", "neck=gem", "last_stride=3", "amp=fp8", "milestones=70,40", "lr=0",
        "gamma=0", "optimizer=lamb", "eval_period=0", "max_steps_per_epoch=0", "mean=0.5,0.5",
        "triplet_margin=-1", "warmup_factor=0", "num_workers=-1",
    ],
)
def test_invalid_values_raise(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        resolve_config(overrides=[override])


def test_p_of_one_is_fine_without_triplet_and_recipe_is_not_an_override():
    c = resolve_config(overrides=["num_identities=1", "triplet_weight=0"])
    assert c.num_identities == 1 and not c.uses_triplet
    with pytest.raises(ConfigError, match="recipe"):
        resolve_config(overrides=["recipe=baseline"])
    with pytest.raises(ConfigError, match="id_weight"):
        resolve_config(overrides=["id_weight=0", "triplet_weight=0"])
    with pytest.raises(ConfigError):
        resolve_config(overrides="epochs=3")  # a bare string, not a list


def test_constructor_validates_too():
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_dict_round_trip_through_json(recipe):
    c = resolve_config(recipe, ["milestones=3,9", "triplet_margin=none", "max_steps_per_epoch=5", "seed=11"])
    d = config_to_dict(c)
    assert isinstance(d["milestones"], list) and isinstance(d["mean"], list)
    back = config_from_dict(json.loads(json.dumps(d)))
    assert back == c and isinstance(back.milestones, tuple)


def test_from_dict_fills_missing_keys_from_recipe_and_rejects_unknown():
    c = config_from_dict({"recipe": "baseline", "epochs": 5})
    assert c == resolve_config("baseline", ["epochs=5"])
    with pytest.raises(ConfigError, match="valid keys"):
        config_from_dict({"recipe": "baseline", "bogus": 1})


def test_compatibility_rules():
    old = resolve_config()
    ok = resolve_config(overrides=["epochs=200", "eval_period=5", "save_period=7", "num_workers=0", "lr=1e-4"])
    assert compatibility_problems(old, ok) == []
    assert compatibility_problems(old, old) == []
    cases = {
        "arch": resolve_config(overrides=["arch=resnet18"]),
        "neck": resolve_config(overrides=["neck=none"]),
        "last_stride": resolve_config(overrides=["last_stride=2"]),
        "height": resolve_config(overrides=["height=384"]),
        "width": resolve_config(overrides=["width=192"]),
        "optimizer": resolve_config(overrides=["optimizer=sgd"]),
        "center_loss_weight": resolve_config("softmax_triplet"),
        "triplet_weight": resolve_config(overrides=["triplet_weight=0"]),
    }
    for field, new in cases.items():
        problems = compatibility_problems(old, new)
        assert len(problems) == 1 and problems[0].startswith(field), (field, problems)
    # a different center weight that keeps the loss on is fine
    assert compatibility_problems(old, resolve_config(overrides=["center_loss_weight=1e-3"])) == []
    # baseline vs full recipe: several problems, each named
    names = {p.split(":")[0] for p in compatibility_problems(resolve_config("baseline"), old)}
    assert {"neck", "last_stride", "center_loss_weight"} <= names


def test_pad_defaults_to_scaled_and_parses_none_or_pixels():
    from reid_search.transforms import AugmentConfig, Preprocess

    assert resolve_config("softmax_triplet_with_center", ["pad=none"]).pad is None
    assert resolve_config("softmax_triplet_with_center", ["pad=3"]).pad == 3
    with pytest.raises(ConfigError, match="pad must be >= 0 or none"):
        resolve_config("softmax_triplet_with_center", ["pad=-1"])
    # the paper's 10 px at 256x128; half the size, half the padding
    assert AugmentConfig().padding(Preprocess(256, 128)) == (10, 10)
    assert AugmentConfig().padding(Preprocess(128, 64)) == (5, 5)
    assert AugmentConfig().padding(Preprocess(384, 128)) == (10, 15)
    assert AugmentConfig(pad=7).padding(Preprocess(128, 64)) == (7, 7)
