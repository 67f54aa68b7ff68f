"""Making a persona from an author's writing.

    sources.py, pdf.py, tweets.py   read each format into raw documents
    json_records.py                 JSON and JSONL records, and the list an export wraps them in
    cleaning.py                     normalise, strip links, drop duplicates
    corpus.py                       build, save and read a corpus with its held-out split
    batching.py                     documents → examples that never run into each other
    trainer.py                      LoRA / full fine-tuning, best checkpoint, exact resume
    runs.py                         a persona's run → registered checkpoint + persona file
    evaluate.py                     held-out perplexity vs the base, originality
    export.py                       a standalone Hugging Face model folder
"""
