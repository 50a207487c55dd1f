"""Perturbation methods: occlusion and Shapley value sampling."""
