"""
How much memory one training step needs, found out before a run allocates it.

    need = step_bytes(model_config, task, batch_size, device)   # bytes
    free = free_bytes(device)                                   # bytes, or None where unknown

A step that does not fit grows until the operating system kills the process, with no message (on a
CPU), or until CUDA runs out of memory deep inside the first step. What a step holds at its peak is
what autograd keeps for the backward pass, the activations, which grow with the batch size and the
sequence length, and the backward pass's own tensors. So the forward pass of a single sequence, adding
up the bytes of every tensor autograd keeps, times the batch size, estimates a step before it runs.
The backward pass adds about as much again: on an H100, copy at 80 tokens and batch 64, the measured
peaks were 2.2, 2.1 and 1.9 times what the forward pass keeps (static 0.37, Hebbian 0.77, gradient
1.03 GiB against 0.17, 0.36 and 0.55), so a step is estimated at twice it (BACKWARD). A run that passes
the check and still runs out of memory stops at its first step with a message that says so (train.py).
"""

import os
import weakref

import torch

from plastic import PlasticGPT

BACKWARD = 2  # a step's peak over what its forward pass keeps, as measured above
REMEDY = "lower --batch-size, or make the sequences (--way, --shot, --query, --seq-len, --delay) or the model smaller"


def saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of the model's forward pass on `batch`,
    each storage counted once (the loss adds next to nothing). Only what is still kept when the forward
    pass ends counts (the gradient rule's inner backward pass saves tensors for graphs it then drops), and
    the parameters do not (step_bytes counts them, once for any batch)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []  # weak references to every tensor saved

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(batch.x, batch.images, fast_norm=False, context=batch.context)
        alive = [tensor for tensor in (ref() for ref in saved) if tensor is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        kept = sum(nbytes for address, nbytes in storages.items() if address not in parameters)
    del out
    return kept


def step_bytes(model_config, task, batch_size: int, device: torch.device) -> int:
    """Estimated peak bytes of one training step: BACKWARD x batch_size x what one sequence saves, plus the
    parameters, their gradients and AdamW's two moments. Uses its own model and generator, so the run's
    initialisation and sequences stay as they are."""
    model = PlasticGPT(model_config).to(device)
    one = task.sample(1, "train", device, torch.Generator(device=device).manual_seed(0))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return BACKWARD * batch_size * saved_bytes(model, one) + 4 * parameters


def free_bytes(device: torch.device) -> int | None:
    """Memory this process can still take: free GPU memory, or the kernel's MemAvailable on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # given in kB
    return None


def is_out_of_memory(error: Exception) -> bool:
    """CUDA's out-of-memory error, Python's MemoryError, or the CPU allocator's failure."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)  # torch.cuda.: also before 2.5
