"""In-pod traffic redirection: one behaviour (SPEC §6), several backends.

``settings`` holds the pure description of what to install; ``backend`` the protocol every
backend implements; ``registry`` maps a backend name to its implementation lazily, so that
choosing iptables never imports bcc and vice versa.
"""
