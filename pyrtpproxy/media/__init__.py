"""The packet paths: the epoll media engine, media worker processes, the recorder and the player."""
