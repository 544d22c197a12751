"""In-context vectors vs few-shot prompting on a trained Flamingo: VQA accuracy and prompt tokens per query.

Rows: 0 / 4 / 8 solved demonstrations in the prompt; the heuristic in-context vector extracted
from 8-shot episodes of training questions; LIVE's vectors trained to imitate the 8-shot model
(both answer from the 0-shot prompt). Queries: `--n` held-apart questions; prints the table and
writes JSON.

  python -m mmjax.train --config configs/flamingo_shapes.py --workdir runs/flamingo_shapes
  python benchmarks/in_context_vectors.py --workdir runs/flamingo_shapes
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax.adapt import icv  # noqa: E402
from mmjax.adapt.wrap import ADAPTER, BASE  # noqa: E402
from mmjax.data import shapes_vqa  # noqa: E402
from mmjax.evals import vqa  # noqa: E402
from mmjax.generate import answer, make_sequence  # noqa: E402
from mmjax.runs import load_run_config, restore_params  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/flamingo_shapes")
  parser.add_argument("--n", type=int, default=256, help="Evaluation questions.")
  parser.add_argument("--fit", type=int, default=256, help="Training questions the vectors are fitted on.")
  parser.add_argument("--shots", type=int, default=8, help="Demonstrations the vectors stand for.")
  parser.add_argument("--live_steps", type=int, default=300)
  parser.add_argument("--out", default="benchmarks/in_context_vectors.json")
  args = parser.parse_args()

  config = load_run_config(args.workdir)
  task, _, params, _ = restore_params(config, args.workdir)
  d = config.data
  kw = dict(seed=d.seed, image_size=d.image_size, held_out_fraction=d.held_out_fraction)
  sequence = make_sequence(task.model, task.tokenizer, config.evals.few_shot.max_len)

  def score(model, model_params, episodes):
    episodes = [shapes_vqa.episode(ep) for ep in episodes]
    start = time.time()
    predictions = answer(model, model_params, icv.fitted(sequence, episodes), episodes,
                                    max_new_tokens=4, batch_size=config.evals.batch_size)
    return dict(accuracy=vqa.exact_match(predictions, [ep["answers"][-1] for ep in episodes]),
                prompt_tokens=icv.prompt_tokens(sequence, episodes), seconds=time.time() - start)

  rows = {}
  for shots in (0, 4, 8):
    rows[f"{shots}-shot prompt"] = score(task.model, params, shapes_vqa.few_shot_set(n=args.n, shots=shots, **kw))
  fit = [shapes_vqa.episode(ep) for ep in shapes_vqa.few_shot_set(n=args.fit, shots=args.shots,
                                                                   train_queries=True, **kw)]
  queries = shapes_vqa.few_shot_set(n=args.n, shots=0, **kw)
  shifted = icv.shifted(task.model)
  start = time.time()
  vectors = icv.extract(task.model, params, sequence, fit)
  rows[f"in-context vector ({args.shots}-shot)"] = dict(score(shifted, {BASE: params, ADAPTER: vectors}, queries),
                                                        fit_seconds=time.time() - start)
  start = time.time()
  live, losses = icv.train_live(task.model, params, sequence, fit, steps=args.live_steps)
  rows[f"LIVE ({args.shots}-shot teacher)"] = dict(score(shifted, {BASE: params, ADAPTER: live}, queries),
                                                   fit_seconds=time.time() - start, loss_first=losses[0],
                                                   loss_last=losses[-1])

  print(f"{'method':<32} {'VQA':>6} {'prompt tokens':>14} {'eval s':>7} {'fit s':>6}")
  for name, r in rows.items():
    fit_s = f"{r['fit_seconds']:.0f}" if "fit_seconds" in r else "-"
    print(f"{name:<32} {r['accuracy']:>6.3f} {r['prompt_tokens']:>14.1f} {r['seconds']:>7.1f} {fit_s:>6}")
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
