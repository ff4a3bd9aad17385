"""The evaluation stage: sample each policy on held-out prompts and compare them.

Reads `<out_dir>/sft/adapter` and `<out_dir>/rl/adapter` (as `eval.models` asks); writes
`<out_dir>/eval/`:
  prompts.jsonl   one row per held-out prompt: prompt, reference, subreddit, reference length
  samples.jsonl   one row per sample: model, prompt_index, completion, lengths, EOS/truncated,
                  abrupt ending, reward, ROUGE-1/2/L against the reference
  report.json     per model: length in chars and tokens (mean, var, std, p5, p50, p95), EOS and
                  truncation rates, abrupt-ending rate, ROUGE, and for `rl` the per-token KL to
                  the SFT policy on its own samples; across models the SFT/RL variance ratio
                  (95% bootstrap interval), the mean change and the ROUGE-L difference
  report.md       the same as a table
Every model samples the same prompts with the same seeds (batch b uses one seed for all), so
differences come from the policies. Finished batches go to `parts/`: a killed run resumes.
The pieces: run.py (sampling, KL), stats.py (pure figures), frontier.py (best-of-N),
report.py (the outputs).
"""
