"""`kvserve convert`: a GQA/MQA variant of a checkpoint that keeps its quality.

options (what a run is), data (standard-library docstrings), fit (calibrated K/V initialisation),
kl (the distillation loss), distill (the training loop), recovery (clipping, skipped steps,
rollbacks, snapshots), checkpoint (resume), heldout (perplexity on Python docs and English prose),
run (the whole conversion), cli (the command line). The written directory is a Hugging Face checkpoint
(model.hf_writer) that `kvserve serve --model DIR` and transformers load, and that a server can
serve beside its base (`--variants native,mqa=DIR`, model.variants.with_converted).
"""
