"""Dataset readers shared by training and evaluation: mask PNG folders (the one mask rule,
:mod:`samkit.data.masks`), COCO instances (:mod:`samkit.data.coco`), SA-1B and
``samkit everything`` output (:mod:`samkit.data.sa1b`)."""
