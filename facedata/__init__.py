"""The data layer: metadata JSON -> batches (the step after the crop and landmark stages, before synthesis).

* :mod:`facedata.landmark_rules`: landmark index rules (forehead reorder of the 81-point model, flip permutation);
* :mod:`facedata.faces`: the frame table of a metadata file, the per-epoch sampler and the face loader;
* :mod:`facedata.quality`: per-frame side information read with the table (FPG's face-quality scores);
* :mod:`facedata.image_folders`: image folders for AIGC detection (listing, suite rules, the loader).

It imports only ``package_utils`` (the stages that write the JSON); synthesis, models and training build on it.
"""
