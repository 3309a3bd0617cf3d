"""Attachment media: type sniffing, image normalization, PDF text. Pure: must never import fastapi, temporalio, sqlalchemy, redis or aiobotocore."""
