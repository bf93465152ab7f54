"""What a quantized base (QLoRA's `lora_base_quant`) costs a trained model, before any adapter moves.

python benchmarks/qlora_accuracy.py --workdir=runs/demo [--stage sft] [--size 600]

Takes a demo run's checkpoint of `--stage` and scores it on the demo's held-out questions
(greedy, as the demo does) with its weights as trained (fp32), cast to bf16, and with its
projection weights quantized to int8 and to NF4 under zero adapters (B = 0: the model QLoRA
starts from). Prints, against fp32, the logit difference on the held-out prompts (mean and
max |delta| of the next-token logits, and how often the top token agrees) and the held-out
accuracy with its 95% interval; ends with `ratio=<nf4 accuracy / bf16 accuracy>`.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from fleming_jax import models, paths  # noqa: E402
from fleming_jax import tokenizer as toklib  # noqa: E402
from fleming_jax.data.records import QARecord, read_jsonl  # noqa: E402
from fleming_jax.engine import LocalEngine  # noqa: E402
from fleming_jax.evaluate import bootstrap_interval, evaluate_records, pass_at_1  # noqa: E402
from fleming_jax.models import decoder  # noqa: E402
from fleming_jax.prompts import record_prompts  # noqa: E402
from fleming_jax.sampler import SamplingParams  # noqa: E402

VARIANTS = {"fp32": {}, "bf16": dict(param_dtype="bfloat16", compute_dtype="bfloat16"),
            "int8": dict(lora_rank=16, lora_base_quant="int8"), "nf4": dict(lora_rank=16, lora_base_quant="nf4")}


def next_token_logits(model, tokenizer, records, batch: int = 64) -> np.ndarray:
    """fp32 logits of the first reply token after each prompt, [records, vocab]."""
    out = []
    for start in range(0, len(records), batch):
        prompts = record_prompts(tokenizer, records[start:start + batch])
        width = max(map(len, prompts))
        ids = np.array([[0] * (width - len(p)) + list(p) for p in prompts], np.int32)  # left-padded
        mask = (np.arange(width)[None] >= (width - np.array([len(p) for p in prompts]))[:, None]).astype(np.int32)
        out.append(np.asarray(model(ids, attention_mask=mask)[:, -1], np.float32))
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/demo", help="a finished demo run (configs/demo.py)")
    parser.add_argument("--stage", default="sft", help="whose checkpoint: sft, rl_stage1 or rl_stage2")
    parser.add_argument("--size", type=int, default=600, help="held-out questions scored")
    args = parser.parse_args()
    checkpoints = paths.join(args.workdir, args.stage, "checkpoints")
    if not paths.exists(checkpoints):
        sys.exit(f"{checkpoints} does not exist: run python main.py --config=configs/demo.py --workdir={args.workdir}")
    config = demo.get_config()
    records = [QARecord.from_dict(r) for r in read_jsonl(paths.join(args.workdir, "synthesize", "validation.jsonl"))]
    records = records[:args.size]
    tokenizer = toklib.load(paths.join(args.workdir, "sft", "tokenizer"))
    params = SamplingParams(temperature=0.0, max_new_tokens=config.demo.eval_max_new_tokens)
    rows, reference = {}, None
    for name, changes in VARIANTS.items():
        model_cfg = config.stages.sft.model.copy_and_resolve_references()
        model_cfg.update(init_from=checkpoints, **changes)
        model, model_config = models.build(model_cfg)
        if model_config.lora_rank:  # zero adapters: what is left is the quantized base
            model = decoder.merge_lora(model)
        logits = next_token_logits(model, tokenizer, records)
        reference = logits if reference is None else reference
        result = evaluate_records(LocalEngine.of(model), tokenizer, records, params, batch_size=len(records))
        per_question = [pass_at_1(r["correct"]) for r in result["outputs"]]
        delta = np.abs(logits - reference)
        rows[name] = dict(mean=float(delta.mean()), max=float(delta.max()),
                          top1=float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
                          accuracy=result["accuracy"], interval=bootstrap_interval(per_question)[1:])
        print(f"[qlora] {name}: accuracy {result['accuracy']:.3f}", flush=True)
    print(f"\n{args.stage} checkpoint of {args.workdir}, {len(records)} held-out questions, greedy")
    print("| base weights | mean abs logit diff vs fp32 | max | top-1 agrees | held-out accuracy [95% CI] |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['mean']:.4f} | {r['max']:.3f} | {r['top1']:.3f} | {r['accuracy']:.3f} "
              f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] |")
    print(f"ratio={rows['nf4']['accuracy'] / max(rows['bf16']['accuracy'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
