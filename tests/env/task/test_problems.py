"""Loading the bundled MATH data: sizes, ids, levels, split separation and the offline fallback."""

import time

import datasets
import pytest

from env.task import problems as math_data
from env.task.problems import MathProblem, load_math500, load_math_train, load_problems
from env.task.prompt import MATH_INSTRUCTION, build_user_message


@pytest.fixture(scope="module")
def math500() -> list[MathProblem]:
    return load_math500("bundled")


@pytest.fixture(scope="module")
def train() -> list[MathProblem]:
    return load_math_train()


def test_math500(math500):
    assert len(math500) == 500
    assert len({p.id for p in math500}) == 500
    assert {p.level for p in math500} == {1, 2, 3, 4, 5}
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert math500[0].subject == "Precalculus"
    assert all(p.problem and p.answer for p in math500)


def test_math_train(train):
    assert len(train) == 7500
    assert len({p.id for p in train}) == 7500
    assert train[0].id == "train/algebra/0"
    assert {p.level for p in train} == {0, 1, 2, 3, 4, 5}
    assert sum(p.level == 0 for p in train) == 2
    assert all(p.answer == p.answer.strip() for p in train)


def test_train_and_test_do_not_overlap(math500, train):
    assert not {p.problem for p in math500} & {p.problem for p in train}


def test_loading_is_deterministic(math500, train):
    assert load_math500("bundled") == math500
    assert load_math_train(limit=10) == train[:10]
    assert load_problems("train") == train


def test_bad_source_and_split_name_allowed_values():
    with pytest.raises(ValueError, match="auto, hub, bundled"):
        load_math500("local")
    with pytest.raises(ValueError, match="train, test"):
        load_problems("validation")


def test_auto_falls_back_to_bundled_quickly(math500, monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    if math_data.hub_reachable():
        pytest.skip("the Hugging Face hub is reachable here")
    caplog.set_level("INFO", logger=math_data.__name__)
    start = time.monotonic()
    problems = load_math500()
    assert time.monotonic() - start < 5
    assert problems == math500
    assert "not reachable" in caplog.text


def fake_hub(monkeypatch, hub_rows: list[dict] | None) -> None:
    """Pretend the hub is reachable and serves ``hub_rows`` (None: the download fails)."""
    real_load_dataset = datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        if path != math_data.MATH500_HUB_ID:
            return real_load_dataset(path, *args, **kwargs)
        if hub_rows is None:
            raise ConnectionError("hub download failed")
        return datasets.Dataset.from_list(hub_rows)

    monkeypatch.setattr(math_data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_rows_become_problems(monkeypatch):
    row = {
        "problem": "What is $1+1$?",
        "solution": r"$1+1=\boxed{2}$",
        "answer": "2",
        "subject": "Prealgebra",
        "level": "Level 3",
        "unique_id": "test/prealgebra/1.json",
    }
    fake_hub(monkeypatch, [row])
    assert load_math500() == [
        MathProblem("test/prealgebra/1.json", "What is $1+1$?", "2", 3, "Prealgebra")
    ]


def test_auto_falls_back_when_the_hub_download_fails(math500, monkeypatch, caplog):
    fake_hub(monkeypatch, None)
    assert load_math500() == math500
    assert "hub download failed" in caplog.text
    with pytest.raises(ConnectionError):
        load_math500("hub")


def test_offline_flag_skips_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not math_data.hub_reachable()


def test_data_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("TTS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="TTS_DATA_DIR"):
        load_math500("bundled")


def test_user_message_asks_for_a_boxed_answer():
    message = build_user_message("What is $1+1$?")
    assert message.startswith("What is $1+1$?")
    assert message.endswith(MATH_INSTRUCTION)
    assert r"\boxed{}" in MATH_INSTRUCTION
