"""lm-evaluation-harness's ``local-completions`` model against the live server, on tiny local
task files (no download): a loglikelihood (multiple choice) task and a generate-until task."""

import json
import os

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

MODEL = "SmolLM2-135M-Instruct"
# lm-eval joins question and choice with its target delimiter, a space.
CHOICES = [{"question": "The capital of France is", "choices": ["Paris", "Berlin", "a potato"], "label": 0},
           {"question": "Two plus two equals", "choices": ["four", "purple", "the moon"], "label": 0}]
QUESTIONS = [{"question": "Q: What is the capital of France?\nA:", "answer": " Paris"}]


def _tasks(root):
    for name, rows in (("mc", CHOICES), ("gen", QUESTIONS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: xlaserve_mc\n" + common.format(path=root / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
          "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        "task: xlaserve_gen\n" + common.format(path=root / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
          "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")


def test_lm_eval_scores_and_generates_through_the_server(server, default_checkpoint, tmp_path):
    """lm-eval's loglikelihoods are the sums of the continuation tokens' logprobs our API
    gives for the same text, the easy choices win, and its generation is our greedy one."""
    from lm_eval.tasks import TaskManager

    def tokenize(text):
        return httpx.post(server + "/v1/tokenize", json={"prompt": text}).json()["tokens"]

    _tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL},base_url={server}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={default_checkpoint},num_concurrent=1,max_retries=1",
        tasks=["xlaserve_mc", "xlaserve_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    assert out["results"]["xlaserve_mc"]["acc,none"] == 1.0
    for sample in out["samples"]["xlaserve_mc"]:
        doc = sample["doc"]
        context = tokenize(doc["question"])
        for choice, resp in zip(doc["choices"], sample["resps"]):
            ours = httpx.post(server + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": context + tokenize(" " + choice), "echo": True, "logprobs": 1,
                "max_tokens": 0}).json()["choices"][0]["logprobs"]
            loglik = resp[0][0]
            assert loglik == pytest.approx(sum(ours["token_logprobs"][len(context):]), abs=1e-4), (doc, choice)
    (gen,) = out["samples"]["xlaserve_gen"]
    greedy = httpx.post(server + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": QUESTIONS[0]["question"], "max_tokens": 8, "temperature": 0,
        "stop": ["\n"]}).json()["choices"][0]["text"]
    assert gen["resps"][0][0] == greedy
