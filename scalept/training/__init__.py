"""The pieces of the training stage; :mod:`scalept.train` puts them together and runs the loop.

- :mod:`.data`: the label-fraction subset, voxel-budget loaders (plans: :mod:`scalept.data.batching`),
  batches on the device, the validation pass;
- :mod:`.optim`: learning-rate scaling, parameter groups, AdamW and its OneCycle schedule;
- :mod:`.bn_recalibration`: BatchNorm statistics of the final weights, drop-path off;
- :mod:`.resume`: what a stopped run needs to continue exactly (checkpoints, RNG, sampler, signals);
- :mod:`.reporting`: TensorBoard, console lines and ``train_metrics.json``.
"""
