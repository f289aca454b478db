"""Bundled search spaces and the paper's presets (package data of ``recommender``)."""
