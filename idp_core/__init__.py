"""IDP core: serve a compressed LLM with a bank of soft prompts, choosing one per request.

Reading order of the serving path:
    config.py   frozen settings (SelectConfig, GenConfig, ...)
    model.py    load a (compressed) model once -> LoadedModel; attach a LoRA adapter
                (packed.py: GPTQ int4 layers on torch's kernels; gptq.py: GPTQ-format folders;
                sparse.py: 2:4 on CUDA)
    bank.py     PromptBank: the soft prompts and their names, saved beside a manifest
    kv.py       each prompt's KV computed once (PromptKVStore), stacked per batch
    select.py   the IDP selection pass: which prompt fits an input
    generate.py the Engine: prefill on the chosen prompt's KV, decode, continuous batching
                (attention.py, rows.py and sampling.py are its helpers)
    build.py    build_engine(): model + bank, LoRA adapter or neither -> Engine
    paths.py    where the default artefacts live

The tools that make and measure artefacts (compression, training, evaluation, reports,
benchmarks, load clients) are in `idp_core.lab`, behind the `idp` command; the HTTP server
(`server/`) uses only the modules above.
"""
