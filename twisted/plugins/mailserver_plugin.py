from twisted.application.service import ServiceMaker

mailserver = ServiceMaker(
    "mailserver",
    "mailserver.tap",
    "A mail server: SMTP in, submission, Maildir storage, POP3 out.",
    "mailserver",
)
