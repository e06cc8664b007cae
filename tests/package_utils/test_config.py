"""YAML configs: _base_ inheritance, typed key=value overrides, and errors naming the key and the file."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from package_utils import crop
from package_utils.config import ConfigError, _merge, build_config, parse_override, read_yaml, set_if_given

DEFAULTS = {
    "num_frames": 32,
    "input": None,
    "faces": "largest",
    "save_mask": False,
    "methods": None,
    "detector": {"name": "retinaface", "score_threshold": 0.7, "upsample": 1},
    "crop": {"scale": 1.5, "size": 320},
}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_copied() -> None:
    config = build_config(DEFAULTS)
    config["crop"]["size"] = 1
    assert config == {**DEFAULTS, "crop": {"scale": 1.5, "size": 1}} and DEFAULTS["crop"]["size"] == 320


def test_base_inheritance(tmp_path: Path) -> None:
    """The child says only what differs; nested keys merge; _base_ is relative to the child's folder."""
    write(tmp_path, "base/root.yaml", "num_frames: 8\ncrop:\n  size: 256\ndetector:\n  name: dlib\n")
    write(tmp_path, "base/mid.yaml", "_base_: root.yaml\ncrop:\n  scale: 1.3\n")
    child = write(tmp_path, "exp/child.yaml", "_base_: ../base/mid.yaml\nnum_frames: 4\n")
    config = build_config(DEFAULTS, child)
    assert config["num_frames"] == 4
    assert config["crop"] == {"scale": 1.3, "size": 256}
    assert config["detector"] == {"name": "dlib", "score_threshold": 0.7, "upsample": 1}
    assert "_base_" not in read_yaml(child)


def test_overrides_keep_their_types(tmp_path: Path) -> None:
    config = build_config(DEFAULTS, write(tmp_path, "c.yaml", "num_frames: 8\n"),
                          ["num_frames=16", "crop.scale=2", "save_mask=true", "methods=[Deepfakes, FaceSwap]",
                           "detector.name=dlib", "input=/data/ff", "detector.score_threshold=0.5"])
    assert config["num_frames"] == 16 and isinstance(config["num_frames"], int)
    assert config["crop"]["scale"] == 2.0 and isinstance(config["crop"]["scale"], float)
    assert config["save_mask"] is True
    assert config["methods"] == ["Deepfakes", "FaceSwap"]
    assert config["detector"] == {"name": "dlib", "score_threshold": 0.5, "upsample": 1}
    assert config["input"] == "/data/ff"


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "crop:\n  size: 128\n")
    assert build_config(DEFAULTS, path, ["crop.size=64"])["crop"]["size"] == 64


@pytest.mark.parametrize("override, key", [("num_frame=4", "num_frame"), ("crop.sizes=4", "crop.sizes"),
                                           ("detector.nms=0.3", "detector.nms")])
def test_unknown_override_key_is_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        build_config(DEFAULTS, None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "crop:\n  size: 128\n  zoom: 2\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'crop.zoom'"):
        build_config(DEFAULTS, path)


def test_bad_key_in_base_names_the_base_file(tmp_path: Path) -> None:
    """The error points at the file the key is written in, not at the child inheriting it."""
    base = write(tmp_path, "base.yaml", "num_frames: 8\nnum_frame: 4\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nfaces: all\n")
    with pytest.raises(ConfigError, match=f"{base}: unknown key 'num_frame'"):
        build_config(DEFAULTS, child)
    write(tmp_path, "base.yaml", "crop:\n  size: big\n")
    with pytest.raises(ConfigError, match=f"{base}: key 'crop.size' must be int"):
        build_config(DEFAULTS, child)


@pytest.mark.parametrize("override, key, wanted", [("num_frames=abc", "num_frames", "int"),
                                                   ("num_frames=2.5", "num_frames", "int"),
                                                   ("save_mask=1", "save_mask", "bool"),
                                                   ("crop.scale=wide", "crop.scale", "float"),
                                                   ("faces=3", "faces", "str"),
                                                   ("crop=5", "crop", "dict")])
def test_wrong_type_is_named(override: str, key: str, wanted: str) -> None:
    with pytest.raises(ConfigError, match=f"key '{key}' must be {wanted}"):
        build_config(DEFAULTS, None, [override])


def test_wrong_type_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "num_frames: [1, 2]\n")
    with pytest.raises(ConfigError, match=f"{path}: key 'num_frames' must be int"):
        build_config(DEFAULTS, path)


def test_base_loop_is_detected(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "_base_: b.yaml\nnum_frames: 1\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\nnum_frames: 2\n")
    with pytest.raises(ConfigError, match="loops back"):
        build_config(DEFAULTS, tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        build_config(DEFAULTS, write(tmp_path, "self.yaml", "_base_: self.yaml\n"))


@pytest.mark.parametrize("text, message", [("_base_: absent.yaml\n", "absent.yaml: config file not found"),
                                           ("- a\n- b\n", "top level must be a mapping"),
                                           ("a: [\n", "not valid YAML"),
                                           ("_base_: [a.yaml]\n", "_base_ must be a file name")])
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(DEFAULTS, write(tmp_path, "c.yaml", text))


def test_malformed_overrides() -> None:
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("num_frames")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")
    assert parse_override("crop.size=") == (["crop", "size"], "")


@pytest.mark.parametrize("override, reason", [
    ("crop.size=!!python/object/apply:os.system [echo hi]", "could not determine a constructor"),
    ("crop.size=[1, 2", "expected ',' or ']'"),
    ("crop.size='abc", "found unexpected end of stream")])
def test_overrides_that_are_not_plain_yaml_are_one_clear_error(override: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"override '{re.escape(override)}': the value is not valid YAML") as caught:
        parse_override(override)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_config_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# Réglages\nnum_frames: 4\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not UTF-8 text \\(byte 0xe9"):
        build_config(DEFAULTS, path)


def test_set_if_given() -> None:
    config = build_config(DEFAULTS)
    set_if_given(config, "crop.size", 96)
    set_if_given(config, "num_frames", None)
    assert config["crop"]["size"] == 96 and config["num_frames"] == 32


def test_stage_defaults_accept_their_own_config_file(tmp_path: Path) -> None:
    """A YAML file naming every crop-stage key round-trips through the stage's defaults."""
    import yaml

    path = write(tmp_path, "crop.yaml", yaml.safe_dump(crop.DEFAULTS))
    assert build_config(crop.DEFAULTS, path) == crop.DEFAULTS


# --- the preprocessing presets in configs/preprocess ------------------------------------------------------

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "preprocess"


def preset_stage(path: Path) -> str:
    """The stage a preset is for: the root of its _base_ chain is that stage's defaults file."""
    import yaml

    while True:
        base = (yaml.safe_load(path.read_text()) or {}).get("_base_")
        if base is None:
            return path.stem
        path = path.parent / base


def load_preset(path: Path) -> dict:
    """A preset as its stage's main loads it (unknown keys and wrong types raise ConfigError)."""
    from package_utils import landmarks

    defaults = {"crop": crop.DEFAULTS, "landmarks": landmarks.DEFAULTS}[preset_stage(path)]
    return build_config(defaults, path)


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads_through_its_stage_with_valid_values(path: Path) -> None:
    from package_utils import align, datasets

    assert preset_stage(path) in ("crop", "landmarks"), f"{path.name}: not based on crop.yaml or landmarks.yaml"
    config = load_preset(path)
    if preset_stage(path) == "crop":
        assert config["dataset"] in datasets.DATASETS and config["split"] in ("train", "val", "test")
        assert config["detector"]["name"] in ("retinaface", "dlib", "none") and config["faces"] in ("largest", "all")
        assert config["num_frames"] > 0 and config["crop"]["size"] > 0
        if config["dataset"] == "ff":
            assert config["compression"] in datasets.FF_COMPRESSIONS
            assert set(config["methods"] or ()) <= set(datasets.FF_METHODS)
    else:
        assert config["landmarks"] in (68, 81) and config["align"] in align.ALIGN_MODES


def test_presets_are_the_named_recipes() -> None:
    """LAA-Net's published runs: raw FF++, 128 train / 32 val-test frames, reals for train/val, rotate+aligned."""
    c23 = load_preset(PRESETS / "ff_c23_train.yaml")
    assert (c23["dataset"], c23["split"], c23["compression"], c23["num_frames"]) == ("ff", "train", "c23", 128)
    splits = {s: load_preset(PRESETS / f"laanet_ff_raw_{s}.yaml") for s in ("train", "val", "test")}
    assert {s: (c["split"], c["compression"], c["num_frames"], c["detector"]["name"], c["crop"]["size"])
            for s, c in splits.items()} == {"train": ("train", "raw", 128, "retinaface", 256),
                                            "val": ("val", "raw", 32, "retinaface", 256),
                                            "test": ("test", "raw", 32, "retinaface", 256)}
    assert splits["train"]["methods"] == splits["val"]["methods"] == ["original"]
    assert set(splits["test"]["methods"]) == {"original", "Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"}
    for points in (81, 68):
        marks = load_preset(PRESETS / f"laanet_landmarks_{points}.yaml")
        assert (marks["landmarks"], marks["align"], marks["save_aligned"]) == (points, "rotate", True)


# --- the stage declarations (package_utils.config.StageSpec) ------------------------------------------------

def stage_specs() -> dict:
    from package_utils import landmarks, partners

    return {"crop": crop.SPEC, "landmarks": landmarks.SPEC, "partners": partners.SPEC}


def other_value(option, tmp_path: Path):
    """A valid value of ``option`` other than its default."""
    if option.switch or isinstance(option.default, bool):
        return not option.default
    if option.choices is not None:
        return next(choice for choice in option.choices if choice != option.default)
    if option.many:
        return ["Deepfakes", "original"]
    if option.type is int:
        return (option.default or 0) + 3
    if option.type is float:
        return round((option.default or 0.4) * 1.5, 3)
    return str(tmp_path / "data" / f"{option.name}_elsewhere")


def as_argv(option, value) -> list[str]:
    if option.switch:
        return [option.flag_text]
    return [option.flag_text, *(map(str, value) if option.many else [str(value)])]


def as_yaml(option, value) -> dict:
    nested = value
    for key in reversed(option.key.split(".")):
        nested = {key: nested}
    return nested


@pytest.mark.parametrize("stage", ["crop", "landmarks", "partners"])
def test_flag_yaml_key_and_keyword_give_the_same_config(stage: str, tmp_path: Path) -> None:
    """Every flag of a stage, its YAML key and its keyword of ``run`` set the same config entry."""
    import yaml

    spec = stage_specs()[stage]
    flagged = [option for option in spec.options if option.flag]
    assert {option.name for option in flagged} == set(spec.flag_to_key)
    values = {option.name: other_value(option, tmp_path) for option in spec.options}
    argv = [text for option in flagged for text in as_argv(option, values[option.name])]
    from_flags = spec.parse(argv)
    yaml_content: dict = {}
    for option in flagged:
        _merge(yaml_content, as_yaml(option, values[option.name]), "test", None)
    from_yaml = spec.parse(["--config", str(write(tmp_path, f"{stage}.yaml", yaml.safe_dump(yaml_content)))])
    from_keywords = spec.config(**{option.name: values[option.name] for option in flagged})
    assert from_flags == from_yaml == from_keywords != spec.defaults
    for option in flagged:  # each one really moved away from its default
        value = from_flags
        for key in option.key.split("."):
            value = value[key]
        assert value == values[option.name] != option.default, option.name
    # settings without a flag: YAML key and keyword still agree
    unflagged = [option for option in spec.options if not option.flag]
    if unflagged:
        content: dict = {}
        for option in unflagged:
            _merge(content, as_yaml(option, values[option.name]), "test", None)
        path = write(tmp_path, f"{stage}_more.yaml", yaml.safe_dump(content))
        assert spec.parse(["--config", str(path)]) == spec.config(**{o.name: values[o.name] for o in unflagged})


def test_keywords_are_checked_like_config_files(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown setting 'crop_sise'"):
        crop.SPEC.config(crop_sise=256)
    with pytest.raises(ConfigError, match="crop.size"):
        crop.SPEC.config(crop_size="big")
    with pytest.raises(ConfigError, match="detector must be one of retinaface, dlib, none"):
        crop.SPEC.config(detector="mtcnn")
    # paths become the strings a config file would hold; ints are accepted for float settings
    config = crop.SPEC.config(input=tmp_path, crop_scale=2)
    assert config["input"] == str(tmp_path) and config["crop"]["scale"] == 2.0
    assert isinstance(config["crop"]["scale"], float)


def test_crop_fingerprint_keeps_its_serialised_form(tmp_path: Path) -> None:
    """Records written before the declaration keep matching: the settings dict has the same keys and values."""
    config = crop.SPEC.config(output=tmp_path / "out", data_root=tmp_path)
    assert crop.fingerprint(config) == {
        "crop_scale": 1.5, "crop_size": 320, "faces": "largest", "max_descriptors": 8, "min_relative_area": 0.5,
        "num_frames": 32, "output": "out", "save_mask": False,
        "detector": {"max_size": 640, "min_face_size": 40, "name": "retinaface", "nms_threshold": 0.4,
                     "score_threshold": 0.7}}
    dlib = crop.fingerprint(crop.SPEC.config(output=tmp_path / "out", data_root=tmp_path, detector="dlib"))
    assert dlib["detector"] == {"name": "dlib", "score_threshold": 0.0, "max_size": 640, "upsample": 1,
                                "min_face_size": 40}


def test_landmark_fingerprint_keeps_its_tags() -> None:
    from package_utils import landmarks

    spec = landmarks.SPEC
    assert spec.fingerprint(spec.config()) == "dlib68_none"
    assert spec.fingerprint(spec.config(align="rotate")) == "dlib68_rotate_saved"  # --align implies --save-aligned
    assert spec.fingerprint(spec.config(landmarks=81, align="similarity", aligned_size=256, calibrate_box=False,
                                        max_landmark_error=0.3)) == "dlib81_similarity256_nocal_err0.3_saved"


#: Output settings that matter only together with another setting: (stage, option) -> the settings they need.
CONDITIONS = {("crop", "upsample"): {"detector": "dlib"}, ("landmarks", "aligned_size"): {"align": "similarity"}}


#: The settings that change what each stage writes (reviewed by hand: workers, backends, devices, tile sizes and
#: kernels do not; the partner search's results do not depend on its tiles, kernel or device).
OUTPUT_SETTINGS = {
    "crop": {"output", "data_root", "num_frames", "detector", "score_threshold", "nms_threshold", "max_size",
             "upsample", "min_face_size", "faces", "min_relative_area", "max_descriptors", "crop_scale", "crop_size",
             "save_mask"},
    "landmarks": {"landmarks", "align", "save_aligned", "aligned_size", "calibrate_box", "max_landmark_error"},
    "partners": {"input", "data_root", "k", "metric", "laa_paths", "candidates", "pool", "keep_bad_landmarks"},
}


@pytest.mark.parametrize("stage", ["crop", "landmarks", "partners"])
def test_fingerprint_changes_exactly_with_output_settings(stage: str, tmp_path: Path) -> None:
    spec = stage_specs()[stage]
    assert {option.name for option in spec.output_options} == OUTPUT_SETTINGS[stage]
    base_settings = {"output": str(tmp_path / "data" / "out"), "data_root": str(tmp_path / "data")}
    for option in spec.options:
        settings = {**base_settings, **CONDITIONS.get((stage, option.name), {})}
        base = spec.config(**settings)
        changed = spec.config(**{**settings, option.name: other_value(option, tmp_path)})
        if option.name == "data_root" and stage == "crop":  # the output must stay inside the data root
            changed = spec.config(**{**settings, "data_root": str(tmp_path)})
        differs = spec.fingerprint(changed) != spec.fingerprint(base)
        assert differs == option.output, f"{stage} {option.name}: output={option.output} but differs={differs}"


def test_crop_fingerprint_follows_the_detector_dfw_implies() -> None:
    """DFW images are already faces: the dataset turns the detector off, and the fingerprint says so."""
    spec = crop.SPEC
    settings = {"output": "/data/out", "data_root": "/data"}
    dfw = crop.fingerprint(spec.config(**settings, dataset="dfw"))
    assert dfw["detector"] == {"name": "none"} == crop.fingerprint(spec.config(**settings, detector="none"))["detector"]
