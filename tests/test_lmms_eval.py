"""lmms-eval's real CLI evaluates a saved nanoVLM with `--model nanovlm_hf` on the `nanovlm_digits` task, and its
scores are our own evaluation's (greedy answers, the same parser).

lmms-eval lives in its own virtualenv (its dependencies fight the pinned CPU torch; docs/clients.md "Installing
lmms-eval"): set LMMS_EVAL to its `lmms-eval` executable, or put it on PATH. Skipped where it is not installed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LMMS_EVAL = os.environ.get("LMMS_EVAL") or shutil.which("lmms-eval")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LMMS_EVAL, reason="lmms-eval is not installed (set LMMS_EVAL to its executable)"),
]


def test_lmms_eval_cli_scores_what_we_score(tmp_path, processor, make_tiny_model):
    sys.path.insert(0, str(ROOT / "examples"))
    from digits import QUESTION, parse_answer
    from training_tools import chat_prompt, generate_answers

    folder = tmp_path / "model"
    model = make_tiny_model().eval()
    model.save_pretrained(folder, processor=processor)
    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "examples" / "lmms_eval" / "nanovlm_digits", tasks / "nanovlm_digits",
                    ignore=shutil.ignore_patterns("*.parquet", "__pycache__"))
    subprocess.run([sys.executable, str(ROOT / "examples" / "lmms_eval" / "write_digits_parquet.py"),
                    "--eval_samples", "12"], check=True, capture_output=True)
    parquet = ROOT / "examples" / "lmms_eval" / "nanovlm_digits" / "test.parquet"
    shutil.move(parquet, tasks / "nanovlm_digits" / "test.parquet")
    task = tasks / "nanovlm_digits" / "nanovlm_digits.yaml"
    task.write_text(task.read_text().replace("examples/lmms_eval/nanovlm_digits/test.parquet",
                                             str(tasks / "nanovlm_digits" / "test.parquet")))
    # the task's utils.py imports examples/digits.py relative to itself
    (tasks / "nanovlm_digits" / "utils.py").write_text(
        (tasks / "nanovlm_digits" / "utils.py").read_text().replace(
            "str(Path(__file__).resolve().parents[2])", repr(str(ROOT / "examples"))))

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [LMMS_EVAL, "--model", "nanovlm_hf", "--model_args", f"pretrained={folder},device=cpu,max_image_tokens=16",
         "--tasks", "nanovlm_digits", "--include_path", str(tasks), "--batch_size", "4", "--log_samples",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    scores = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())["results"]["nanovlm_digits"]

    import datasets

    rows = datasets.Dataset.from_parquet(str(tasks / "nanovlm_digits" / "test.parquet"))
    prompt = chat_prompt(processor, QUESTION)
    answers = generate_answers(model, processor, [[row["image"].convert("RGB")] for row in rows],
                               [prompt] * len(rows), 8, max_image_tokens=16)
    guesses, truths = [parse_answer(a) for a in answers], [parse_answer(row["answer"]) for row in rows]
    assert scores["digit_accuracy,none"] == pytest.approx(sum(g[0] == t[0] for g, t in zip(guesses, truths)) / 12)
    assert scores["quadrant_accuracy,none"] == pytest.approx(sum(g[1] == t[1] for g, t in zip(guesses, truths)) / 12)
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("*samples_nanovlm_digits.jsonl")
               for line in path.read_text().splitlines()]
    responses = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
                 for s in samples]
    assert sorted(responses) == sorted(answers)  # the very answers, not just the score
