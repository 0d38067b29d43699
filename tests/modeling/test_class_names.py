"""Every vocabulary makes distinct, non-empty CLIP text queries."""

import pytest
from open_clip.tokenizer import SimpleTokenizer

from hiervl.modeling.backbone.class_names import query_text, validate_class_names


def test_query_text_is_what_the_tokenizer_encodes():
    tokenizer = SimpleTokenizer()
    for a, b in [("Circle", "circle"), ("  circle ", "circle"), ("traffic_light", "traffic light")]:
        assert query_text(a) == query_text(b)
        assert tokenizer.encode(query_text(a)) == tokenizer.encode(query_text(b))
    assert query_text("tv/monitor") == "tv or monitor"
    assert query_text("circle") != query_text("circles")


def test_valid_names_come_back_unchanged():
    assert validate_class_names(["background", "Person", "traffic_light"], "x") == (
        "background",
        "Person",
        "traffic_light",
    )


def test_duplicates_after_normalisation_name_both_entries():
    with pytest.raises(ValueError) as e:
        validate_class_names(["circle", "square", "Circle "], "classes.txt")
    message = str(e.value)
    assert message.startswith("classes.txt: class names #0 'circle' and #2 'Circle '")
    assert "same text query 'circle'" in message
    with pytest.raises(ValueError, match="#0 'a_b' and #1 'A B'"):
        validate_class_names(["a_b", "A B"], "vocab")


@pytest.mark.parametrize("names", [[], ()])
def test_empty_vocabulary(names):
    with pytest.raises(ValueError, match=r"^--vocabulary: the vocabulary is empty"):
        validate_class_names(names, "--vocabulary")


@pytest.mark.parametrize("bad", ["", "   ", "__", None, 3])
def test_empty_or_non_string_names(bad):
    with pytest.raises(ValueError, match=r"class name #1 .* is not a non-empty string"):
        validate_class_names(["cat", bad], "TEST.VOCABULARY")
