"""Data: records, readers (JSONL, BEIR), and dataset builders."""
