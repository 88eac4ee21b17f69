"""Pure protocol codecs shared by several roles: bytes in, values out, no sockets.

Tests feed them a byte at a time; the services wrap them around streams.
"""
