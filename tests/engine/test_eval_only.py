"""``train_net.py --eval-only``: loads MODEL.WEIGHTS strictly and writes metrics.json."""

import json

import pytest
import torch
from detectron2.engine import default_argument_parser
from tiny_training import FAST_OPTS, TINY_CONFIG, tiny_cfg

from hiervl.engine import launcher
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.trainer import HierVLTrainer


def _args(output_dir, *opts, eval_only=True):
    argv = ["--config-file", TINY_CONFIG] + (["--eval-only"] if eval_only else [])
    opts = [*FAST_OPTS, "OUTPUT_DIR", output_dir, *opts]
    return default_argument_parser().parse_args(argv + [str(o) for o in opts])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny-model checkpoint whose weights differ from any fresh initialisation."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(123)
    model = HierVLTrainer.build_model(tiny_cfg(folder))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    HierVLCheckpointer(model, str(folder)).save("tiny_weights")
    return str(folder / "tiny_weights.pth")


@pytest.mark.slow
def test_eval_only_loads_weights_and_writes_metrics(tmp_path, checkpoint, monkeypatch):
    evaluated = []
    real_test = HierVLTrainer.test.__func__

    def spy(cls, cfg, model, evaluators=None):
        evaluated.append(model)
        return real_test(cls, cfg, model, evaluators)

    monkeypatch.setattr(HierVLTrainer, "test", classmethod(spy))
    out = str(tmp_path / "eval")
    args = _args(out, "MODEL.WEIGHTS", checkpoint, "DATASETS.TEST", "('synthetic_val',)")
    results = launcher.main(args)

    saved = torch.load(checkpoint, map_location="cpu")["model"]
    loaded = evaluated[0].state_dict()
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    miou = metrics["synthetic_val"]["sem_seg"]["mIoU"]
    assert 0.0 <= miou <= 100.0
    assert miou == pytest.approx(results["sem_seg"]["mIoU"])


def test_checkpoint_of_another_architecture_names_the_file(tmp_path, checkpoint):
    other = (
        "MODEL.HIERVL.DECODER.HIDDEN_DIM", 32,
        "MODEL.HIERVL.PIXEL_DECODER.CONV_DIM", 32,
    )  # fmt: skip
    args = _args(str(tmp_path), "MODEL.WEIGHTS", checkpoint, *other)
    with pytest.raises(ValueError, match="does not fit this model's architecture") as err:
        launcher.main(args)
    assert repr(checkpoint) in str(err.value)
    assert "weights of another shape" in str(err.value)


def test_eval_only_without_weights_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="--eval-only needs the weights"):
        launcher.main(_args(str(tmp_path)))
    message = "cannot read MODEL.WEIGHTS checkpoint .*missing.pth: no such file"
    with pytest.raises(ValueError, match=message):
        launcher.main(_args(str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / "missing.pth")))
