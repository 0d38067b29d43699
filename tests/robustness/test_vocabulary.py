"""Class names: names that are one CLIP text query, empty names and empty vocabularies are
refused wherever a vocabulary comes from (finding 6 of issue 10: ``circle``/``Circle`` were
accepted, ``--vocabulary ""`` was silently ignored)."""

import importlib.util

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from robustness_helpers import REPO, TINY_CONFIG

from hiervl.engine.launcher import setup_cfg
from hiervl.meta_arch import vocabulary_from_cfg

TINY = str(TINY_CONFIG)


def test_test_vocabulary_duplicates_after_normalisation():
    cfg = setup_cfg(TINY, ["TEST.VOCABULARY", ["circle", "square", "Circle "]])
    with pytest.raises(ValueError) as err:
        vocabulary_from_cfg(cfg)
    assert str(err.value) == (
        "TEST.VOCABULARY: class names #0 'circle' and #2 'Circle ' are the same text query "
        "'circle' once CLIP's tokenizer normalises case and whitespace"
    )
    cfg = setup_cfg(TINY, ["TEST.VOCABULARY", ["cat", "  "]])
    with pytest.raises(ValueError, match=r"^TEST.VOCABULARY: class name #1 '  ' is not a "):
        vocabulary_from_cfg(cfg)


def test_dataset_class_names_are_checked_naming_the_dataset():
    name = "robustness_vocab_set"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, list)
    MetadataCatalog.get(name).set(stuff_classes=["road", "Road", "car"])
    cfg = setup_cfg(TINY, ["DATASETS.TRAIN_LABELED", (name,)])
    with pytest.raises(
        ValueError, match=rf"^the classes of dataset '{name}': class names #0 'road' "
    ):
        vocabulary_from_cfg(cfg)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "--vocabulary '': the vocabulary is empty; give at least one class name"),
        (" , ,", "--vocabulary ' , ,': the vocabulary is empty; give at least one class name"),
        (
            "cat,dog,CAT",
            "--vocabulary 'cat,dog,CAT': class names #0 'cat' and #2 'CAT' are the same text "
            "query 'cat' once CLIP's tokenizer normalises case and whitespace",
        ),
    ],
)
def test_demo_vocabulary_is_checked_before_the_model_is_built(tmp_path, caplog, value, message):
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "demo" / "demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.setup_logger = lambda **kwargs: None

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    script.SemanticPredictor = no_model
    argv = ["--config-file", TINY, "--input", str(tmp_path / "a.png")]
    argv += ["--output", str(tmp_path / "out"), "--vocabulary", value]
    with caplog.at_level("ERROR"):
        assert script.main(argv) == 1
    assert message in caplog.text
