"""torch-neuronx backend (Inf2/Trn1): `torch_neuronx.trace(model, inputs, compiler_args=...)`.

neuronx-cc casts fp32 matmuls to bf16 by default; `--auto-cast none` keeps fp32.
"""

from batchjob.backends.neuron import NeuronSdkBackend

BACKEND = NeuronSdkBackend("neuronx", "torch_neuronx", ("--auto-cast", "none"))
