"""The parts of a distillation step, each an object the configuration chooses.

`lightning_caopd.module.DistillationModule.training_step` runs them in the paper's order:

* ``teacher``: the frozen teacher, one type whichever it is (a separate model, a frozen copy of
  the student, or a LoRA student with its adapter off).
* ``prompts``: the teacher's inputs from the template and the confidence targets.
* ``loss``: the loss path ``method.loss`` picks (full vocabulary, chunked, top-k + tail, fused),
  checked against the models at start-up.
* ``result``: the step's typed result (what is logged, what callbacks read) and the interface
  callbacks may read from the module.
"""
