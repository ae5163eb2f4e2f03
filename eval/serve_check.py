"""One export through `llmslim serve` and the openai client, its greedy tokens against transformers'.

    .venv/bin/python eval/serve_check.py EXPORT [EXPORT ...]

Completions: llmslim.check's prompts, 24 greedy tokens each (ignore_eos), the token ids the server returns
against transformers' float32 greedy tokens: equal where llmslim.cpu says vLLM computes the format exactly
in float32 here, else within its near-tie tolerance, else the reason nothing can be compared. Chat
completions: one question through the model's chat template, the reply text against transformers'
greedy continuation of the same rendered prompt (up to its end-of-turn token).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LLMSLIM = REPO / ".venv" / "bin" / "llmslim"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_served(export: Path, timeout: float = 900) -> dict[str, Any]:
    """{"kind", "verdict", "completions", "chat"} for one export (the server stopped afterwards)."""
    import openai
    import torch

    from llmslim import cpu
    from llmslim.check import PROMPTS, greedy, load_for_check, near_tie_violations, vllm_run_for
    from llmslim.loading import load_tokenizer

    kind = cpu.export_kind(json.loads((export / "config.json").read_text()))
    plan = vllm_run_for(export)
    port = _free_port()
    log = open(export.parent / f"serve-{export.name}.log", "w")
    proc = subprocess.Popen([str(LLMSLIM), "serve", str(export), "--port", str(port), "--served-model-name", "m",
                             "--quiet", "--", "--enforce-eager"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.flush()
                said = [ln for ln in Path(log.name).read_text().splitlines()
                        if ln.startswith("error:")]
                return {"kind": kind, "verdict": f"refused: {said[-1][len('error: '):]}" if said else
                        f"the server exited ({proc.returncode}): see {log.name}"}
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    return {"kind": kind, "verdict": f"no answer after {timeout:.0f} s"}
                time.sleep(1)
        reply = client.completions.create(model="m", prompt=PROMPTS, max_tokens=TOKENS, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
        choices = sorted(reply.choices, key=lambda c: c.index)
        served = [list(c.token_ids) for c in choices]
        tokenizer = load_tokenizer(export)
        prompts = [list(c.prompt_token_ids) for c in choices]
        model = load_for_check(export)
        chat = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=TOKENS, temperature=0)
        rendered = tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
        with torch.no_grad():
            ours = model.generate(torch.tensor([rendered]), max_new_tokens=TOKENS, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id)[0, len(rendered):]
        ours_text = tokenizer.decode(ours, skip_special_tokens=True).strip()
        chat_text = (chat.choices[0].message.content or "").strip()
        if not plan.generates or not plan.faithful:
            verdict = f"not compared: {plan.why}"
        elif plan.exact:
            expected = greedy(model, prompts, TOKENS)
            same = sum(a == b for x, y in zip(served, expected) for a, b in zip(x, y))
            verdict = (f"equal ({same} of {TOKENS * len(served)} tokens, float32)" if served == expected else
                       f"DIFFERENT: {same} of {TOKENS * len(served)} tokens equal")
        else:
            bad, worst, exact = near_tie_violations(model, prompts, served, plan.near_tie)
            verdict = (f"{exact} of {TOKENS * len(served)} tokens the float32 argmax, the rest near-ties "
                       f"(largest gap {worst:.4f}; {plan.why})" if not bad else f"DIFFERENT: {bad[0]}")
        chat_verdict = "same text" if chat_text == ours_text else f"differs: {chat_text!r} vs {ours_text!r}"
        return {"kind": kind, "verdict": f"{verdict}; chat: {chat_verdict}", "chat_reply": chat_text,
                "completions": [c.text for c in choices]}
    finally:
        try:
            os.killpg(proc.pid, 2)  # Ctrl-C: llmslim serve stops vLLM's engine with it
            proc.wait(60)
        except ProcessLookupError:  # it had exited (a refusal, a failed start): nothing left to stop
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(path, json.dumps(check_served(Path(path)), indent=2))
