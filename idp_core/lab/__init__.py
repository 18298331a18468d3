"""The lab: tools that make and measure artefacts, behind the `idp` command (cli.py).

Data, compression, training, perplexity and task evaluation, the recovery report, benchmarks,
load clients and server-process harnesses. `server/` never imports this package.
"""
