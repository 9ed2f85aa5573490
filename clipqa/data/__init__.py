"""COCO-QA on disk and the offline demo: the reader, splits and batches (cocoqa), the synthetic demo dataset (demo),
and clipqa-download (download). Imports only clipqa's shared names."""
