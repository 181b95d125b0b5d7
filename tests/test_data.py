import json

import pytest

from sd2_utils import data


def test_spec_bench_has_480_questions_in_13_categories():
    spec_bench = data.load_spec_bench()

    assert len(spec_bench) == 480
    assert len(set(spec_bench["category"])) == 13
    groups = {data.category_group(c) for c in spec_bench["category"]}
    assert groups == set(data.SPEC_BENCH_GROUPS)


def test_spec_bench_mt_bench_questions_have_two_turns():
    spec_bench = data.load_spec_bench()
    mt_rows = spec_bench.filter(lambda row: data.category_group(row["category"]) == "mt_bench")

    assert len(mt_rows) == 80
    assert all(len(turns) == 2 for turns in mt_rows["turns"])


def test_mt_bench_has_80_questions():
    mt_bench = data.load_mt_bench()

    assert len(mt_bench) == 80
    assert mt_bench[0]["turns"][0]["role"] == "user"


def test_humaneval_has_164_problems():
    humaneval = data.load_humaneval()

    assert len(humaneval) == 164
    assert humaneval[0]["id"] == "humaneval-0"
    assert "def has_close_elements" in humaneval[0]["turns"][0]["content"]
    assert humaneval[0]["reference"]


def test_gsm8k_reference_is_final_number():
    test_split = data.load_gsm8k("test")
    train_split = data.load_gsm8k("train")

    assert len(test_split) == 1319
    assert len(train_split) == 7473
    assert test_split[0]["reference"] == "18"
    assert [turn["role"] for turn in train_split[0]["turns"]] == ["user", "assistant"]


def test_sharegpt_recovers_complete_conversations():
    sharegpt = data.load_sharegpt()

    assert len(sharegpt) == 17359
    for turns in sharegpt.select(range(200))["turns"]:
        assert turns[0]["role"] == "user"
        assert turns[-1]["role"] == "assistant"


def test_sharegpt_truncated_file_keeps_complete_records(tmp_path, caplog):
    head = data.sharegpt_path().read_bytes()[:200_000]
    cut_file = tmp_path / "cut.json"
    cut_file.write_bytes(head)
    expected, truncated = data._iter_json_array(head.decode("utf-8", errors="ignore"))

    with caplog.at_level("INFO", logger="sd2_utils.data"):
        sharegpt = data.load_sharegpt(path=cut_file)

    assert truncated
    assert 0 < len(sharegpt) <= len(expected)
    assert "truncated at end of file: 1" in caplog.text


def test_sharegpt_speaker_names_map_to_roles():
    conversation = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "hi"},
        {"from": "chatgpt", "value": "hello"},
        {"from": "user", "value": "bye"},
        {"from": "bard", "value": "goodbye"},
    ]

    turns = data._sharegpt_turns(conversation)

    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert data._sharegpt_turns([{"from": "narrator", "value": "x"}]) is None


def test_sharegpt_sampling_is_seeded():
    first = data.load_sharegpt(num_samples=5, seed=3)["id"]
    second = data.load_sharegpt(num_samples=5, seed=3)["id"]

    assert first == second
    assert first != data.load_sharegpt(num_samples=5, seed=4)["id"]


def test_sample_per_category_takes_n_of_each():
    sample = data.sample_per_category(data.load_spec_bench(), per_category=2, seed=0)

    assert len(sample) == 26
    assert sample["id"] == data.sample_per_category(data.load_spec_bench(), 2, seed=0)["id"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "question.jsonl"
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["What is 2 + 2?"]})
    path.write_text(good + "\n" + '{"question_id": 2, "category": "qa", "turns": [\n')

    with pytest.raises(data.DataFormatError, match=r"question\.jsonl:2: invalid JSON"):
        data.load_spec_bench(path)


def test_record_missing_field_is_reported(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")

    with pytest.raises(data.DataFormatError, match="record 1 lacks the field"):
        data.load_spec_bench(path)


def test_unknown_benchmark_is_rejected():
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        data.load_benchmark("mmlu")


def test_evaluation_prompts_include_spec_bench_and_gsm8k_test():
    prompts = data.evaluation_prompts()
    gsm8k_question = data.load_gsm8k("test")[0]["turns"][0]["content"]

    assert data.normalize_prompt(gsm8k_question) in prompts
    assert data.normalize_prompt(data.load_spec_bench()[0]["turns"][0]["content"]) in prompts
