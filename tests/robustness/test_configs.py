"""Config files and command-line overrides: nothing runs, every mistake is one line.

Finding 1 of issue 10: a python tag in a config ran code through ``train_net.py``, the
demo and everything calling ``setup_cfg`` (detectron2's ``merge_from_file`` falls back to
``yaml.unsafe_load``). Every case asserts the exact message and that no payload ran and no
file changed.
"""

import os
import subprocess
import sys

import pytest
from robustness_helpers import REPO, TINY_CONFIG, digest

from hiervl.config_loader import MAX_VALUES, ConfigError, load_config

TINY = str(TINY_CONFIG)


def _write(path, text):
    path.write_text(text)
    return str(path)


def _refused(path, message, opts=()):
    before = digest(path) if os.path.isfile(path) else None
    with pytest.raises(ConfigError) as err:
        load_config(str(path), list(opts))
    assert str(err.value) == message
    assert "\n" not in str(err.value)
    if before is not None:
        assert digest(path) == before, "the config file changed"


def test_finding1_python_tag_runs_nothing_through_train_net(tmp_path):
    """The issue's reproduction, through the real command line."""
    touched = tmp_path / "x"
    config = _write(
        tmp_path / "evil.yaml",
        f'_BASE_: "{TINY}"\nSEED: !!python/object/apply:os.system ["touch {touched}"]\n',
    )
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", config],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ERROR: {config}:2: python tags are not allowed in configs"
    )
    assert not touched.exists(), "the payload ran"


def test_python_tag_in_a_base_file_is_named(tmp_path, marker):
    base = _write(
        tmp_path / "base.yaml",
        f'_BASE_: "{TINY}"\nMODEL:\n'
        f'  WEIGHTS: !!python/object/apply:builtins.open ["{marker}", "w"]\n',
    )
    child = _write(tmp_path / "child.yaml", "_BASE_: base.yaml\nSEED: 3\n")
    before = digest(base)
    _refused(child, f"{base}:3: python tags are not allowed in configs")
    assert digest(base) == before


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "!!binary aGVsbG8=",
            "YAML tags (!!binary) are not allowed in configs; write the plain value",
        ),
        ("!!set {a, b}", "YAML tags (!!set) are not allowed in configs; write the plain value"),
        ("!!str 3", "YAML tags (!!str) are not allowed in configs; write the plain value"),
        ("!mytag 3", "YAML tags (!mytag) are not allowed in configs; write the plain value"),
        ("!!python/name:os.system", "python tags are not allowed in configs"),
    ],
)
def test_every_yaml_tag_is_refused(tmp_path, value, message):
    path = _write(tmp_path / "tagged.yaml", f"SOLVER:\n  BASE_LR: 0.1\nOUTPUT_DIR: {value}\n")
    _refused(path, f"{path}:3: {message}")


def test_anchors_aliases_and_merge_keys_are_plain_yaml(tmp_path):
    path = _write(
        tmp_path / "anchors.yaml",
        f'_BASE_: "{TINY}"\n'
        "SOLVER: &solver\n  BASE_LR: 0.25\n  MAX_ITER: 7\n"
        "TEST:\n  SLIDING_WINDOW: &window {CROP_SIZE: 96, STRIDE: 48}\n"
        "MODEL:\n  HIERVL:\n    HSQG: {<<: {MIN_ACTIVE: 2, NUM_LEVELS: 1}, NUM_LEVELS: 3}\n"
        "DATASETS:\n  TEST: &names [synthetic_val]\n  TRAIN: *names\n",
    )
    cfg = load_config(path)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (0.25, 7)
    assert (cfg.TEST.SLIDING_WINDOW.CROP_SIZE, cfg.TEST.SLIDING_WINDOW.STRIDE) == (96, 48)
    assert (cfg.MODEL.HIERVL.HSQG.MIN_ACTIVE, cfg.MODEL.HIERVL.HSQG.NUM_LEVELS) == (2, 3)
    assert cfg.DATASETS.TEST == cfg.DATASETS.TRAIN == ("synthetic_val",)


def test_alias_bomb_is_refused_without_expanding(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = _write(tmp_path / "laughs.yaml", "\n".join(lines) + "\n")  # 10^9 values expanded
    _refused(
        path,
        f"{path}: the YAML expands to more than {MAX_VALUES} values (aliases of aliases?); "
        "a config has a few hundred",
    )


def test_recursive_alias_is_refused(tmp_path):
    path = _write(tmp_path / "loop.yaml", "DATASETS:\n  TEST: &loop [a, *loop]\n")
    _refused(path, f"{path}: an alias refers to itself (a recursive value)")


def test_base_cycle_is_refused(tmp_path):
    a = _write(tmp_path / "a.yaml", "_BASE_: b.yaml\nSEED: 1\n")
    b = _write(tmp_path / "b.yaml", "_BASE_: a.yaml\nSEED: 2\n")
    _refused(a, f"{b}:1: _BASE_ 'a.yaml' makes a cycle (a.yaml -> b.yaml -> a.yaml)")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "SOLVER:\n  BASE_RL: 0.1\n",
            2,
            "unknown config key SOLVER.BASE_RL (did you mean SOLVER.BASE_LR?)",
        ),
        ("BASE_LR: 0.1\n", 1, "unknown config key BASE_LR (did you mean SOLVER.BASE_LR?)"),
        (
            "SOLVER:\n  MAX_ITER: many\n",
            2,
            "SOLVER.MAX_ITER must be of type int (default 40000), got str 'many'",
        ),
        (
            "SOLVER: 3\n",
            1,
            "SOLVER is a group of keys (LR_SCHEDULER_NAME, MAX_ITER, BASE_LR, ...), got 3",
        ),
        ("SEED:\n  VALUE: 3\n", 1, "SEED takes a value like -1, not a group of keys"),
        (
            "SEED: 1\nSEED: 2\n",
            2,
            "key SEED is written twice in one mapping (first on line 1); YAML would keep only "
            "the last",
        ),
        (
            "SOLVER:\n  BASE_LR: [0.1\n",
            3,
            "invalid YAML: while parsing a flow sequence, expected ',' or ']', but got "
            "'<stream end>'",
        ),
        ("- a\n- b\n", 1, "a config is a mapping of KEY: value lines, got a list"),
        ("VERSION: 1\n", 1, "VERSION 1 configs are not supported; HierVL configs are VERSION 2"),
        (
            '_BASE_: "https://example.com/base.yaml"\n',
            1,
            "_BASE_ 'https://example.com/base.yaml' must be a local file, not a URL",
        ),
        ("_BASE_: missing.yaml\n", 1, None),
    ],
)
def test_mistakes_in_a_file_are_one_line(tmp_path, text, line, message):
    path = _write(tmp_path / "my.yaml", text)
    if message is None:  # a missing base is named with its resolved path
        message = f"config file {tmp_path / 'missing.yaml'} does not exist"
        _refused(path, message)
        return
    _refused(path, f"{path}:{line}: {message}")


def test_unreadable_config_files(tmp_path):
    _refused(tmp_path / "none.yaml", f"config file {tmp_path / 'none.yaml'} does not exist")
    _refused(tmp_path, f"config file {tmp_path} is a folder, not a file")
    binary = tmp_path / "model.pth"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00garbage")
    _refused(binary, f"config file {binary} is not UTF-8 text (invalid start byte at byte 4)")
    loop = tmp_path / "loop.yaml"
    os.symlink(loop, loop)
    _refused(loop, f"cannot read config file {loop}: Too many levels of symbolic links")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"SEED: 1\n\x00\n")
    with pytest.raises(ConfigError, match=rf"^{nul}:2: invalid YAML: .*special characters"):
        load_config(str(nul))


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (
            ["SOLVER.BASE_RL", "0.1"],
            "unknown config key SOLVER.BASE_RL (did you mean SOLVER.BASE_LR?)",
        ),
        (
            ["SOLVER.MAX_ITER", "ten"],
            "SOLVER.MAX_ITER must be of type int (default 300), got str 'ten'",
        ),
        (["SOLVER.MAX_ITER"], "overrides are KEY VALUE pairs; 'SOLVER.MAX_ITER' has no value"),
        (["SEED.X", "1"], "SEED is a value, it has no key SEED.X"),
        (
            ["MODEL.HIERVL", "1"],
            "MODEL.HIERVL is a group of keys (CLIP, HSQG, PIXEL_DECODER, ...), got 1",
        ),
        (["_BASE_", "x.yaml"], "_BASE_ is only allowed in config files"),
    ],
)
def test_command_line_mistakes_are_one_line(opts, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, opts)
    assert str(err.value) == f"command line: {message}"


def test_command_line_values_are_literals_never_code(marker):
    cfg = load_config(TINY, ["SOLVER.BASE_LR", "1", "INPUT.CROP.SIZE", "(64, 64)"])
    assert cfg.SOLVER.BASE_LR == 1.0 and cfg.INPUT.CROP.SIZE == (64, 64)  # int -> float
    code = f"__import__('builtins').open('{marker}', 'w')"
    cfg = load_config(TINY, ["OUTPUT_DIR", code])  # not a literal: kept as a string
    assert cfg.OUTPUT_DIR == code


def test_demo_refuses_a_tagged_config(tmp_path, marker, caplog):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "demo" / "demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.setup_logger = lambda **kwargs: None
    config = _write(
        tmp_path / "evil.yaml",
        f'_BASE_: "{TINY}"\nSEED: !!python/object/apply:builtins.open ["{marker}", "w"]\n',
    )
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    argv = ["--config-file", config, "--input", str(image), "--output", str(tmp_path / "o")]
    with caplog.at_level("ERROR"):
        assert script.main(argv) == 1
    assert f"{config}:2: python tags are not allowed in configs" in caplog.text
