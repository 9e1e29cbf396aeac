"""Training: state -> optim, stopping, checkpointing (all the resume policy) -> loop -> setup -> fit.

Layer: training. Its modules import the layers below (foundation, building blocks, run services, methods)
and each other in that order; only the tools (`engine`, `sweep`, `reproduce`, ...) and the CLI import it.
"""
