"""The read side: find, read, verify and export what the service archived.

It depends on the store and on the documents' formats only, never on the write side:
everything it knows about a recording comes from the objects in the bucket.
"""
