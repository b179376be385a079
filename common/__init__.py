"""The floor every layer may stand on: file primitives and the result contract.

Plain Python (standard library and `filelock`): no torch, no pandas, so
`lightning_modules`, `experiments` and `analysis` can all import it without
breaking the layering (analysis never imports torch or the training code).
"""
