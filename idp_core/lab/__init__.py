"""The lab: tools that make and measure artefacts (training, curves), behind the `idp` command.

The server never imports this package.
"""
