-- Argo CD health of kubetune.io's FineTuneJob and ModelDeployment, read from the conditions the
-- operator writes (Ready, Progressing, Degraded) and from observedGeneration. Argo CD takes one
-- script per kind; argocd-cm.yaml installs this one under both, and the kinds differ only in the
-- words below and in spec.suspend, which only a FineTuneJob has.
local hs = {}

local words = {
  FineTuneJob = { healthy = "a run is promoted", progressing = "a run is active" },
  ModelDeployment = { healthy = "serving", progressing = "rolling out" },
}
local said = words[obj.kind]

local function condition(name)
  if obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == name then
        return c
      end
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function message_of(c, default)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return default
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to report a status"
  return hs
end

-- A status (or condition) written for an older spec says nothing about the current one.
local generation = obj.metadata.generation
if generation ~= nil then
  local stale = obj.status.observedGeneration == nil or obj.status.observedGeneration < generation
  for _, name in ipairs({ "Ready", "Progressing", "Degraded" }) do
    local c = condition(name)
    if c ~= nil and c.observedGeneration ~= nil and c.observedGeneration < generation then
      stale = true
    end
  end
  if stale then
    hs.status = "Progressing"
    hs.message = string.format("waiting for the operator to observe generation %d", generation)
    return hs
  end
end

local ready = condition("Ready")
local progressing = condition("Progressing")
local degraded = condition("Degraded")

-- A FineTuneJob's latest run failed; a ModelDeployment rolled back (the newest artifact failed;
-- the previous one may still serve), failed a rollout or is unhealthy; or the spec cannot work
-- (reason InvalidSpec, ...).
if is_true(degraded) then
  hs.status = "Degraded"
  hs.message = message_of(degraded, "degraded")
  return hs
end

-- spec.suspend lets an active run finish; only then is the job idle for good.
if obj.kind == "FineTuneJob" and obj.spec ~= nil and obj.spec.suspend == true and not is_true(progressing) then
  hs.status = "Suspended"
  hs.message = message_of(progressing, "spec.suspend is true: no new runs start")
  return hs
end

if is_true(ready) and not is_true(progressing) then
  hs.status = "Healthy"
  hs.message = message_of(ready, said.healthy)
  return hs
end

-- A run is active or a rollout under way; or no run has passed the promotion gate yet.
hs.status = "Progressing"
if is_true(progressing) then
  hs.message = message_of(progressing, said.progressing)
else
  hs.message = message_of(ready, "waiting for the operator to report conditions")
end
return hs
