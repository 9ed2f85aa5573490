"""COCO-QA on disk and the offline demo: the reader, splits and batches (cocoqa), the synthetic demo dataset (demo),
and clipqa-download (download: the archives and the whole job; fetch: resumable HTTP; archive: verify and extract).
Imports only clipqa's shared names."""
