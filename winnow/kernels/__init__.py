"""Kernel backends the model code runs on, chosen once at start-up."""
