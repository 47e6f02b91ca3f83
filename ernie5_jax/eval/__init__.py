"""Evaluation of trained decoders.

  scoring.py           log-likelihood scoring of unified-sequence documents (probes)
  job.py               the eval job (--mode=eval): elastic family report + routing analysis
  watch.py             the continuous eval job (--mode=eval --watch) beside training
  tensorboard.py       the report as TensorBoard scalars, text and images
  routing.py           routing statistics (expert frequency, top-expert IoU, entropy)
  routing_plots.py     their PNG plots
  digit_classifier.py  classifier of 16x16 digit images (scores generated images, RL reward)
"""
