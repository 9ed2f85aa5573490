"""Scoring a model: accuracy per question type and loss over a split, prediction files (scoring), WUPS (wups)."""
