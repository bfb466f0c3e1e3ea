-- Rules for the tests: a word in the Subject forces each of Rspamd's
-- actions, and TEST_ENVELOPE reports (as its options) what the MTA told
-- Rspamd about the message, so a test can check the request headers.

local function subject_has(word)
  return function(task)
    local subject = task:get_subject() or ''
    return subject:find(word, 1, true) ~= nil
  end
end

rspamd_config.TEST_ADD_HEADER = { callback = subject_has('[add-header]'), score = 7.0 }
rspamd_config.TEST_REWRITE = { callback = subject_has('[rewrite]'), score = 10.0 }
rspamd_config.TEST_GREYLIST = { callback = subject_has('[greylist]'), score = 4.5 }
rspamd_config.TEST_SOFT_REJECT = { callback = subject_has('[soft-reject]'), score = 12.5 }

local function request_header(task, name)
  local value = task:get_request_header(name)
  return value and tostring(value) or ''
end

local function addresses(list)
  local out = {}
  for _, address in ipairs(list or {}) do
    table.insert(out, address.addr)
  end
  return table.concat(out, ' ')
end

rspamd_config.TEST_ENVELOPE = {
  callback = function(task)
    local from = task:get_from('smtp')
    return true, 0.0,
      'ip=' .. tostring(task:get_from_ip()),
      'helo=' .. (task:get_helo() or ''),
      'from=' .. ((from and from[1] and from[1].addr) or ''),
      'rcpt=' .. addresses(task:get_recipients('smtp')),
      'user=' .. (task:get_user() or ''),
      'queue-id=' .. (task:get_queue_id() or ''),
      'tls=' .. request_header(task, 'TLS-Version') .. '/' .. request_header(task, 'TLS-Cipher'),
      'mta=' .. request_header(task, 'MTA-Name'),
      'size=' .. tostring(task:get_size())
  end,
  score = 0.0,
}
