"""Serving: the TorchServe-independent ensemble runner (``runner``, imports torch), the model-archive builder
(``archive``) and TorchServe process control (``torchserve_process``). Import the submodule you need; this
package imports nothing so that light callers never pay for torch."""
